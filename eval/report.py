"""Collect ``summary.json`` and ``bench.json`` files of finished runs into markdown tables.

    python eval/report.py results/<date> --out report.md          # offline, realtime and bench tables, one file
    python eval/report.py docs/results --tables offline --out docs/results.md --section results
    python eval/report.py methods results/multirun/... --bench results/<bench folder> --out docs/methods.md \
        --section methods --plot docs/figures/pareto_methods.png  # the caching methods: one table, one Pareto plot

With ``--section NAME`` the tables replace only what stands between the ``<!-- NAME:start -->`` and
``<!-- NAME:end -->`` lines of the ``--out`` file, so the prose around them stays (docs/results.md and
docs/methods.md are written that way; their "How these tables are made" lists the commands).

Rows are grouped by task and sorted by cache method; runs of one config on disjoint seeds are merged into one
row (``merge_runs``). Latencies come from separate processes, so they
are not compared here: speedups against ``cache=none`` are eval/bench.py's job (one process, interleaved).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.common import write_out  # noqa: E402

ORDER = ["none", "uniform", "unified_acs", "blockwise_acs", "bac"]


def load(dirs: list[Path]) -> list[dict]:
    """Every eval/run.py ``summary.json`` under ``dirs``; a file that cannot be read, or that is not a rollout
    summary (a deploy or bench one), is skipped and named."""
    rows = []
    for p in (p for d in dirs for p in sorted(d.rglob("summary.json"))):
        try:
            row = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"skipping {p}: unreadable ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        if not isinstance(row, dict) or "success_rate" not in row:
            print(f"skipping {p}: not a rollout summary (no success_rate)", file=sys.stderr)
            continue
        rows.append(row | {"_path": str(p.parent)})
    if not rows:
        raise FileNotFoundError(f"no summary.json under {[str(d) for d in dirs]}")
    return rows


def _order(r: dict):
    return (ORDER.index(r["cache"]) if r["cache"] in ORDER else 99,
            (r.get("cache_stats") or {}).get("schedule", {}).get("n_updates") or 0)


def _head(head: str) -> list[str]:
    """A markdown table's header and separator lines."""
    return [head, "|" + "---|" * (head.count("|") - 1)]


def _by_task(rows: list[dict], key) -> list[tuple[str, list[dict]]]:
    """Rows grouped by task (sorted), each group sorted by ``key``."""
    return [(task, sorted((r for r in rows if r["task"] == task), key=key)) for task in sorted({r["task"] for r in rows})]


def realtime_table(rows: list[dict]) -> str:
    """Realtime-loop runs: success next to what the loop did (misses, stale actions, action age)."""
    rows = [r for r in rows if r.get("loop") == "realtime"]
    if not rows:
        return ""
    head = ("| task | cache | S | n | queued | episodes | success [95% CI] | latency p50 / p95 / p99 ms | control Hz "
            "| misses / episode | stale dropped / episode | action age ms | FLOPs ratio |")
    lines = _head(head)
    for task, group in _by_task(rows, lambda r: (_order(r), r["loop_config"]["chunk_actions"])):
        for r in group:
            sched = (r.get("cache_stats") or {}).get("schedule", {})
            lo, hi = r["success_ci95"]
            lat, n = r["latency_ms"], r["n_episodes"]
            lines.append(
                f"| {task} | {r['cache']} | {sched.get('n_updates') or '-'} | {sched.get('n_bubble') or '-'} "
                f"| {r['loop_config']['chunk_actions']} | {n} "
                f"| {r['success_rate']:.2f} [{lo:.2f}, {hi:.2f}] | {lat['p50']:.0f} / {lat['p95']:.0f} / {lat['p99']:.0f} "
                f"| {r['control_hz']:.1f} | {r['deadline_misses'] / n:.1f} | {r['stale_dropped'] / n:.1f} "
                f"| {r['action_age_ms'] if r['action_age_ms'] is not None else '-'} | {r.get('flops_ratio', 1.0):.3f} |"
            )
    return "\n".join(lines) + "\n"


def merge_runs(rows: list[dict]) -> list[dict]:
    """Offline runs of one config on disjoint seed ranges (same task, checkpoint path and model hash where the
    summaries record it, sampler, cache and knobs) as one
    row: successes and episodes summed and the Wilson interval recomputed; latency and Hz are the runs' means
    weighted by episodes (each run measured its own). ``seeds`` becomes the list of ranges."""
    from bac.metrics import wilson_interval

    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("loop", "offline") != "offline":
            continue
        key = json.dumps([r["task"], r.get("checkpoint"), r.get("model_hash"), r.get("scheduler"),
                          r.get("num_inference_steps"), run_key(r), r.get("device")])
        groups.setdefault(key, []).append(r)
    out = []
    for group in groups.values():
        ranges = sorted(tuple(r.get("seeds") or (None, None)) for r in group)
        disjoint = None not in (x for rg in ranges for x in rg) and all(a[1] < b[0] for a, b in zip(ranges, ranges[1:]))
        if len(group) == 1 or not disjoint:
            out.extend(group)
            continue
        n = sum(r["n_episodes"] for r in group)
        k = sum(r.get("n_successes", round(r["success_rate"] * r["n_episodes"])) for r in group)
        mean = lambda f: sum(f(r) * r["n_episodes"] for r in group) / n  # noqa: E731
        merged = dict(group[0], n_episodes=n, n_successes=k, success_rate=k / n, success_ci95=list(wilson_interval(k, n)),
                      seeds=[list(rg) for rg in ranges], inference_hz=mean(lambda r: r["inference_hz"]),
                      control_hz=mean(lambda r: r["control_hz"]),
                      latency_ms={q: mean(lambda r: r["latency_ms"][q]) for q in group[0]["latency_ms"]},
                      _path=[r["_path"] for r in group])
        out.append(merged)
    return out + [r for r in rows if r.get("loop", "offline") != "offline"]


def table(rows: list[dict]) -> str:
    rows = [r for r in rows if r.get("loop", "offline") == "offline"]
    if not rows:
        return ""
    head = ("| task | cache | S | n | episodes | success [95% CI] | latency p50 / p95 ms | inference Hz "
            "| control Hz | FLOPs ratio | device |")
    lines = _head(head)
    for task, group in _by_task(rows, _order):
        for r in group:
            sched = (r.get("cache_stats") or {}).get("schedule", {})
            lo, hi = r["success_ci95"]
            lines.append(
                f"| {task} | {r['cache']} | {sched.get('n_updates') or '-'} | {sched.get('n_bubble') or '-'} "
                f"| {r['n_episodes']} | {r['success_rate']:.2f} [{lo:.2f}, {hi:.2f}] "
                f"| {r['latency_ms']['p50']:.0f} / {r['latency_ms']['p95']:.0f} | {r['inference_hz']:.2f} "
                f"| {r['control_hz']:.2f} | {r.get('flops_ratio', 1.0):.3f} | {r['device']} |"
            )
    return "\n".join(lines) + "\n"


def bench_table(dirs: list[Path], name: str | None = None) -> str:
    """One markdown table of every bench.json under ``dirs`` (eval/bench.py output); ``name`` keeps only the
    bench folders of that name (e.g. ``bench_quiet``). The ``run`` column is the bench's folder under the
    directory it was found in (``can/bench_quiet``; ``can`` for ``can/bench.json``)."""
    lines = ["| run | task | config | latency p50 / p95 ms | speedup vs none | FLOPs ratio | speedup / FLOPs ceiling "
             "| floor-aware ceiling (speedup / it) | action MSE | device |", "|---|---|---|---|---|---|---|---|---|---|"]
    found = sorted((p, d) for d in dirs for p in d.rglob("bench.json") if name is None or p.parent.name == name)
    for path, d in found:
        run = path.parent.relative_to(d).as_posix()
        run = d.name if run == "." else run
        b = json.loads(path.read_text())
        m = b["meta"]
        sampler = f"{m.get('scheduler')}-{m.get('num_inference_steps')}"
        task = m["task"] if sampler in ("ddpm-100", "None-None") else f"{m['task']} ({sampler})"
        for r in b["rows"]:
            floor = "-" if r.get("floor_ceiling") is None else f"{r['floor_ceiling']:.2f}x ({r['speedup_vs_floor_ceiling']:.2f})"
            lines.append(f"| {run} | {task} | {r['config']} | {r['latency_ms']['p50']:.0f} / "
                         f"{r['latency_ms']['p95']:.0f} | {r['speedup']:.2f}x | {r['flops_ratio']:.3f} "
                         f"| {r['speedup_vs_flops']:.2f} | {floor} | {r['action_mse']:.2e} | {r['device']} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


IGNORED_KNOBS = ("n_obs", "schedule")  # knobs that do not change what a method computes at run time


UNUSED_KNOBS = {"uniform": ("n_bubble", "metric"), "unified_acs": ("n_bubble",), "blockwise_acs": ("n_bubble",)}


def cache_key(name: str, knobs: dict | None) -> tuple:
    """A cache config's identity across eval/run.py summaries and eval/bench.py rows (knobs that a method
    reads from the shared cache config but does not use, such as n_bubble for uniform, are left out)."""
    knobs = knobs or {}
    skip = IGNORED_KNOBS + ("name",) + UNUSED_KNOBS.get(name, ())
    return (name, tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in knobs.items() if k not in skip)))


def knob_label(name: str, knobs: dict | None) -> str:
    """The knobs that set a method's budget, for tables and legends."""
    keys = {"uniform": ["n_updates"], "bac": ["n_updates", "n_bubble"], "bac_forecast": ["n_updates", "forecaster"],
            "fora": ["interval"], "delta_dit": ["n_cached_layers", "interval"],
            "profiling": ["n_always", "interval", "warmup"], "ertacache": ["n_updates"], "teacache": ["delta"],
            "fbcache": ["threshold"], "bwcache": ["threshold", "max_reuse"], "toca": ["interval", "ratio"],
            "taylorseer": ["interval", "order"], "foca": ["interval"], "abcache": ["interval", "order"],
            "hyca": ["interval"]}.get(name, [])
    knobs = knobs or {}
    return ", ".join(f"{k}={knobs[k]}" for k in keys if k in knobs) or "-"


def bench_rows(dirs: list[Path]) -> dict:
    """(task, sampler, cache key) -> bench row (with the bench's meta) from every bench.json under ``dirs``;
    the sampler is e.g. ``ddpm-100``."""
    out = {}
    for path in sorted(p for d in dirs for p in d.rglob("bench.json")):
        b = json.loads(path.read_text())
        sampler = f"{b['meta'].get('scheduler')}-{b['meta'].get('num_inference_steps')}"
        for r in b["rows"]:
            knobs = r.get("knobs") or {"name": r["cache"]}
            key = cache_key(r["cache"], knobs if r["cache"] != "none" else {})
            out[(b["meta"]["task"], sampler, key)] = r | {"_meta": b["meta"]}
    return out


def run_key(r: dict) -> tuple:
    """``cache_key`` of a rollout summary. Summaries written before ``cache_config`` was recorded carry the
    knobs in their schedule's stats instead."""
    cfg = r.get("cache_config")
    if cfg is None:
        sched = (r.get("cache_stats") or {}).get("schedule", {})
        cfg = {k: sched[k] for k in ("n_updates", "n_bubble", "metric") if sched.get(k) is not None}
    return cache_key(r["cache"], cfg if r["cache"] != "none" else {})


def method_rows(rows: list[dict], bench: dict) -> list[dict]:
    """Offline rollouts joined with the benchmark row of the same config (speedup, action error)."""
    out = []
    for r in rows:
        if r.get("loop", "offline") != "offline":
            continue
        cfg = r.get("cache_config") or {"name": r["cache"]}
        b = bench.get((r["task"], f"{r.get('scheduler')}-{r.get('num_inference_steps')}", run_key(r)), {})
        out.append({"task": r["task"], "cache": r["cache"], "knobs": knob_label(r["cache"], cfg),
                    "n": r["n_episodes"], "success": r["success_rate"], "ci": r["success_ci95"],
                    "flops_ratio": r.get("flops_ratio", 1.0), "speedup": b.get("speedup"),
                    "action_mse": b.get("action_mse")})
    return out


def methods_table(rows: list[dict]) -> str:
    """Every method's rollouts next to ``cache=none`` of the same task: success and whether it stays within
    the uncached 95% interval, FLOPs reduction in the rollouts, benchmark speedup and action error."""
    if not rows:
        return ""
    head = ("| task | method | knobs | episodes | success [95% CI] | within none's CI | FLOPs reduction (rollouts) "
            "| speedup (bench) | action MSE (bench) |")
    lines = _head(head)
    for task, group in _by_task(rows, lambda r: (r["cache"] != "none", r["cache"], -r["flops_ratio"])):
        base = next((r for r in group if r["cache"] == "none"), None)
        for r in group:
            lo, hi = r["ci"]
            within = "-" if base is None or r is base else ("yes" if r["success"] >= base["ci"][0] else "no")
            speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
            mse = "-" if r["action_mse"] is None else f"{r['action_mse']:.2e}"
            lines.append(
                f"| {task} | {r['cache']} | {r['knobs']} | {r['n']} | {r['success']:.2f} [{lo:.2f}, {hi:.2f}] | {within} "
                f"| {1 / r['flops_ratio']:.2f}x | {speedup} | {mse} |"
            )
    return "\n".join(lines) + "\n"


def pareto_plot(rows: list[dict], out: Path) -> Path:
    """Success against speedup (benchmark speedup where the config was benchmarked, else FLOPs reduction), one
    panel per task, the uncached interval shaded and the Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 5), squeeze=False)
    methods = sorted({r["cache"] for r in rows if r["cache"] != "none"})
    cmap = plt.get_cmap("tab10")
    markers = "osD^v<>pPhX*"
    for ax, task in zip(axes[0], tasks):
        group = [r for r in rows if r["task"] == task]
        base = next((r for r in group if r["cache"] == "none"), None)
        if base is not None:
            ax.axhspan(*base["ci"], color="0.88", zorder=0, label="none: 95% CI")
            ax.scatter([1.0], [base["success"]], color="k", marker="*", s=120, zorder=3, label="none")
        pts = []
        for i, m in enumerate(methods):
            ms = [r for r in group if r["cache"] == m]
            if not ms:
                continue
            x = [r["speedup"] if r["speedup"] is not None else 1 / r["flops_ratio"] for r in ms]
            y = [r["success"] for r in ms]
            ax.scatter(x, y, color=cmap(i % 10), marker=markers[i % len(markers)], s=60, label=m, zorder=3,
                       edgecolor="k" if m.startswith("bac") else "none")
            pts += list(zip(x, y))
        front, best = [], -1.0
        for x, y in sorted(pts, key=lambda p: -p[0]):
            if y > best:
                front.append((x, y))
                best = y
        if front:  # best success reachable at >= each speedup: a staircase falling to the right
            fx, fy = zip(*sorted(front))
            ax.step(fx, fy, where="pre", color="k", lw=1, ls="--", zorder=2, label="Pareto front")
        ax.set_xscale("log")
        ticks = [1, 1.5, 2, 3, 4, 6, 8, 12]
        ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("speedup vs none (bench, batch 1; FLOPs reduction if not benched)")
        ax.set_ylabel(f"success rate ({base['n'] if base else '?'} episodes)")
        ax.set_title(task)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


TABLES = ("offline", "realtime", "bench")


def methods_main(argv) -> None:
    p = argparse.ArgumentParser(prog="report.py methods", description=methods_table.__doc__)
    p.add_argument("results", nargs="+", help="folders of eval/run.py results (hydra multirun folders)")
    p.add_argument("--bench", nargs="*", default=[], help="folders with bench.json from eval/bench.py bench=methods")
    p.add_argument("--out", default=None)
    p.add_argument("--section", default=None, help="write between this section's markers in --out (see above)")
    p.add_argument("--plot", default=None)
    a = p.parse_args(argv)
    rows = method_rows(load([Path(r) for r in a.results]), bench_rows([Path(b) for b in a.bench]))
    md = methods_table(rows)
    bench = bench_table([Path(b) for b in a.bench])
    if bench:
        md += "\nBenchmarks (eval/bench.py bench=methods: batch 1, one process, interleaved rounds):\n\n" + bench
    print(md)
    if a.out:
        write_out(Path(a.out), md, a.section)
    if a.plot:
        print(f"plot: {pareto_plot(rows, Path(a.plot))}")


def main(argv=None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "methods":
        return methods_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+")
    p.add_argument("--tables", default=",".join(TABLES), help=f"comma-separated, of {list(TABLES)}")
    p.add_argument("--out", default=None)
    p.add_argument("--section", default=None, help="write between this section's markers in --out (see above)")
    a = p.parse_args(argv)
    tables = a.tables.split(",")
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        p.error(f"--tables {a.tables!r}: unknown {unknown}; known: {list(TABLES)}")
    dirs = [Path(r) for r in a.results]
    rows = load(dirs) if {"offline", "realtime"} & set(tables) else []
    md = table(merge_runs(rows)) if "offline" in tables else ""
    rt = realtime_table(rows) if "realtime" in tables else ""
    # a caption separates a table from the one before it; a table alone stands under the prose of its section
    if rt:
        md += ("\nRealtime loop (the simulated world runs at its control rate while the policy computes; "
               "asynchronous inference, stale actions dropped, hold on a miss):\n\n" if md else "") + rt
    bench = bench_table(dirs) if "bench" in tables else ""
    if bench:
        md += ("\nBenchmark (eval/bench.py: one process, interleaved rounds, batch 1):\n\n" if md else "") + bench
    print(md)
    if a.out:
        write_out(Path(a.out), md, a.section)


if __name__ == "__main__":
    main()
