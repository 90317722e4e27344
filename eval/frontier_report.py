"""The frontier's report: pooled success per cell, the Pareto set, the cells within the reference's interval, a
recommendation per latency budget, the proxies' rank correlation, the table (``frontier.md``, ``frontier.json``)
and the plot (``frontier.png``). ``eval/frontier.py`` measures what this reads.

Across tasks (the README's summary: what a user should run, per task, and whether any cache earns its place):

    python eval/frontier_report.py docs/frontier/lift docs/frontier/can docs/frontier/square \
        --out README.md --section frontier --plot docs/figures/frontier_tasks.png
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bac.frontier import choose_for_budget, pareto, pooled
from eval.common import write_atomic, write_out
from eval.frontier_grid import Cell

if TYPE_CHECKING:
    from omegaconf import DictConfig

BUDGETS_MS = (10, 15, 20, 30, 40, 60, 100, 200, 400)  # the report's recommended config per p95 budget


def collect(cells: list[Cell], out: Path, latency: dict | None) -> list[dict]:
    """One row per cell: pooled success over its seed sets (only full runs: a folder with a summary.json), and
    its latency, FLOPs and proxies from ``latency.json``. A run on other weights than the timed ones (a checkpoint
    retrained in place) is left out, with the reason printed."""
    lat = (latency or {}).get("cells", {})
    timed_hash = (latency or {}).get("meta", {}).get("model_hash")
    rows = []
    for c in cells:
        summaries = []
        for f in sorted((out / "cells" / c.label).glob("s*/summary.json")):
            try:
                s = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as e:
                print(f"skipping {f}: {e}", flush=True)
                continue
            if timed_hash and s.get("model_hash") not in (None, timed_hash):
                print(f"skipping {f}: rolled out with model hash {s['model_hash']}, the timed weights are {timed_hash}",
                      flush=True)
                continue
            summaries.append(s)
        row = {"label": c.label, "sampler": c.sampler, "K": c.K, "start": c.start, "cache": c.name, "knobs": dict(c.cache),
               **{k: v for k, v in lat.get(c.label, {}).items() if k not in ("sampler", "K", "start", "cache", "knobs")}}
        if summaries:
            row["success"] = pooled([s["n_successes"] for s in summaries], [s["n_episodes"] for s in summaries])
            row["seed_sets"] = [s["seeds"] for s in summaries]
            row["mean_episode_steps"] = round(float(np.mean([s["mean_episode_steps"] for s in summaries])), 1)
            row.update(choice_counts(summaries))
        rows.append(row)
    return rows


def choice_counts(summaries: list[dict]) -> dict:
    """On a scene where the instruction names one of several objects (the summary's ``language`` block), the named
    object and any other handled, pooled over the seed sets like the success: a sampler or cache that loses the
    instruction shows here even where it keeps the grasp. Empty where any seed set lacks the block."""
    blocks = [s.get("language") for s in summaries]
    if not blocks or not all(b and "named_handled" in b and "other_handled" in b for b in blocks):
        return {}
    n = [int(b["n"]) for b in blocks]
    return {key: pooled([round(b[key] * k) for b, k in zip(blocks, n)], n) for key in ("named_handled", "other_handled")}


def analyse(rows: list[dict], reference: str) -> dict:
    """Pareto set (p50 latency against pooled success), the cells at or above the reference's lower interval
    bound, the fastest of those, and each proxy's Spearman rank correlation with success."""
    done = [r for r in rows if "success" in r and "latency_ms" in r]
    front = [done[i]["label"] for i in pareto([r["latency_ms"]["p50"] for r in done],
                                              [r["success"]["rate"] for r in done])]
    ref = next((r for r in done if r["label"] == reference), None)
    within = []
    if ref is not None:
        lo = ref["success"]["ci95"][0]
        within = sorted((r for r in done if r["success"]["rate"] >= lo), key=lambda r: r["latency_ms"]["p50"])
    proxies = {}
    for key in proxy_keys(rows):
        pts = [(r[key], r["success"]["rate"]) for r in done if key in r]
        if len(pts) >= 3:
            proxies[key] = round(spearman([-a for a, _ in pts], [b for _, b in pts]), 3)
    recommended = []
    for budget in BUDGETS_MS:
        if done:
            pick = choose_for_budget(done, budget, latency=lambda r: r["latency_ms"]["p95"],
                                     successes=lambda r: (r["success"]["successes"], r["success"]["episodes"]))
            if pick["meets_budget"]:
                recommended.append({"budget_ms": budget, "label": pick["row"]["label"],
                                    "success": pick["row"]["success"], "p95_ms": pick["row"]["latency_ms"]["p95"]})
    return {"pareto": front, "reference": reference, "recommended": recommended,
            "reference_ci95": ref["success"]["ci95"] if ref else None,
            "within_reference": [r["label"] for r in within],
            "fastest_within_reference": within[0]["label"] if within else None,
            "proxy_spearman": proxies, "n_cells_done": len(done)}


def proxy_keys(rows: list[dict]) -> list[str]:
    """The action-error proxies the rows carry (``mse_vs_<sampler><K>``, frontier.proxy_refs), in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r if k.startswith("mse_vs_")))


def proxy_name(key: str) -> str:
    """``mse_vs_ddpm100`` -> ``DDPM-100``; ``mse_vs_flow100`` -> ``flow-100``."""
    m = re.fullmatch(r"mse_vs_(.+?)(\d+)", key)
    if not m:
        return key
    sampler = m.group(1).upper() if m.group(1) in ("ddpm", "ddim") else m.group(1)
    return f"{sampler}-{m.group(2)}"


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # ties share their mean rank
            r[x == v] = r[x == v].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def write_report(cfg: DictConfig, rows: list[dict], summary: dict, out: Path, latency: dict | None) -> None:
    meta = (latency or {}).get("meta", {})
    write_atomic(out / "frontier.json", json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=2) + "\n")
    front = set(summary["pareto"])
    within = set(summary["within_reference"])
    keys = proxy_keys(rows)
    choice = any("other_handled" in r for r in rows)  # a scene where the instruction names the object
    env_group = f"{cfg.env.name}_lang" if cfg.env.get("language") else str(cfg.env.name)  # configs/env/<group>.yaml
    command = f"python eval/frontier.py env={env_group} env.task={cfg.env.task}"
    if str(cfg.policy.name) != "dpt":  # another policy family has its own grid (configs/frontier/<name>.yaml)
        command += f" policy={cfg.policy.name} policy.checkpoint={cfg.policy.checkpoint} frontier={cfg.frontier.name}"
    lines = [f"# Frontier: {cfg.env.task}" + (f" ({cfg.policy.checkpoint})" if str(cfg.policy.name) != "dpt" else ""), "",
             f"`{command}` — success over "
             f"{cfg.frontier.n_episodes}-episode seed sets (pooled where a cell has several), batch-1 latency of one "
             f"action chunk timed in one process in {meta.get('trials', '?')} interleaved rounds on "
             f"{meta.get('device', '?')}. ★ Pareto set; ✓ success at or above the lower end of "
             f"{summary['reference']}'s 95% interval {summary['reference_ci95']}.", "",
             "| config | success [95% CI] | episodes | "
             + ("named object handled [95% CI] | another handled | " if choice else "") + "p50 ms | p95 ms | FLOPs | "
             + "".join(f"MSE vs {proxy_name(k)} | " for k in keys) + "|",
             "|---|---|---|" + "---|---|" * choice + "---|---|---|" + "---|" * len(keys) + "---|"]
    for r in sorted(rows, key=lambda r: r.get("latency_ms", {}).get("p50", float("inf"))):
        s = r.get("success")
        succ = f"{s['rate']:.2f} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]" if s else "not run"
        lat = r.get("latency_ms", {})
        mark = ("★" if r["label"] in front else "") + ("✓" if r["label"] in within else "")
        named = ""
        if choice:
            nh, oh = r.get("named_handled"), r.get("other_handled")
            named = (f"{nh['rate']:.2f} [{nh['ci95'][0]:.2f}, {nh['ci95'][1]:.2f}] | {oh['successes']}/{oh['episodes']} | "
                     if nh else "- | - | ")
        lines.append(f"| {r['label']} | {succ} | {s['episodes'] if s else 0} | {named}{lat.get('p50', float('nan')):.1f} | "
                     f"{lat.get('p95', float('nan')):.1f} | {r.get('flops_ratio', float('nan')):.3f} | "
                     + "".join(f"{r.get(k, float('nan')):.2e} | " for k in keys) + f"{mark} |")
    lines += ["", "Recommended per latency budget (the highest measured success whose frontier p95 meets the budget, "
              "the faster on a tie; `eval/tune.py` re-times the candidates on the device it runs on):", "",
              "| p95 budget | config | success [95% CI] | p95 ms |", "|---|---|---|---|"]
    for rec in summary["recommended"]:
        s = rec["success"]
        lines.append(f"| {rec['budget_ms']} ms | {rec['label']} | {s['rate']:.2f} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}] | "
                     f"{rec['p95_ms']:.1f} |")
    lines += ["", f"Pareto set (fastest first): {', '.join(summary['pareto']) or '-'}.",
              f"Fastest config within {summary['reference']}'s interval: {summary['fastest_within_reference'] or '-'}.",
              "Rank correlation of each action-error proxy (lower error = better) with rollout success over the "
              f"{summary['n_cells_done']} cells: " + (", ".join(f"{k} {v:+.2f}" for k, v in summary["proxy_spearman"].items())
                                                     or "-") + ".", ""]
    write_atomic(out / "frontier.md", "\n".join(lines))
    plot(rows, summary, out / "frontier.png", str(cfg.env.task))
    print("\n".join(lines), flush=True)


def plot(rows: list[dict], summary: dict, path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any("success" in r and "latency_ms" in r for r in rows):
        return
    fig, ax = plt.subplots(figsize=(12, 6))
    draw(ax, rows, summary, task)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def draw(ax, rows: list[dict], summary: dict, task: str, labels: bool = True) -> None:
    """One task's frontier on ``ax``: every cell with its interval, the reference's interval as a band, the
    Pareto front as a dashed step line."""
    import matplotlib

    done = [r for r in rows if "success" in r and "latency_ms" in r]
    colors = {"ddpm": "tab:red", "ddim": "tab:blue", "dpmsolver": "tab:green", "unipc": "tab:purple"}
    markers = {"none": "o", "uniform": "s", "bac": "D", "ertacache": "^", "fbcache": "v", "teacache": "P", "fora": "<",
               "foca": ">", "taylorseer": "h", "abcache": "p", "hyca": "H", "toca": "d", "delta_dit": "8", "bwcache": "X"}
    if len({r["sampler"] for r in done}) == 1:  # one sampler (a flow VLA's grid): the colour tells the caches apart
        caches = list(dict.fromkeys(r["cache"] for r in done))
        palette = matplotlib.colormaps["tab20"]
        colour = {c: palette(i % 20) for i, c in enumerate(caches)}
    else:
        colour = None
    ref = next((r for r in done if r["label"] == summary["reference"]), None)
    if ref is not None:
        lo, hi = ref["success"]["ci95"]
        ax.axhspan(lo, hi, color="0.9", zorder=0, label=f"{summary['reference']} 95% interval")
    seen = set()
    for r in done:
        x, s = r["latency_ms"]["p50"], r["success"]
        lo, hi = s["ci95"]
        warm = bool(r.get("start"))
        key = (r["sampler"], r["cache"], warm)
        name = r["sampler"] + (" + warm start" if warm else "") + ("" if r["cache"] == "none" else f" + {r['cache']}")
        ax.errorbar(x, s["rate"], yerr=[[s["rate"] - lo], [hi - s["rate"]]],
                    fmt="*" if warm else markers.get(r["cache"], "X"),
                    color=colour[r["cache"]] if colour else colors.get(r["sampler"], "k"),
                    ms=9 if warm else 6, capsize=2, alpha=0.85, label=None if key in seen else name)
        seen.add(key)
        if labels and ((r["cache"] == "none" and not warm) or r["label"] in summary["pareto"]):
            ax.annotate(r["label"].split("[")[0].replace("+", "\n+"), (x, s["rate"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=6)
    front = [next(r for r in done if r["label"] == lab) for lab in summary["pareto"]]
    ax.step([r["latency_ms"]["p50"] for r in front], [r["success"]["rate"] for r in front], where="post",
            color="k", lw=1, ls="--", label="Pareto front")
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xticks([t for t in (2, 5, 10, 20, 50, 100, 200, 500) if t <= 2 * max(r["latency_ms"]["p50"] for r in done)])
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    xs = [r["latency_ms"]["p50"] for r in done]
    ax.set_xlim(min(xs) / 1.25, max(xs) * 1.4)
    ax.set_xlabel("batch-1 latency per action chunk, p50 (ms, log scale)")
    ax.set_ylabel("success rate (95% Wilson interval)")
    ax.set_title(f"{task}: success against latency over samplers, step counts and caches")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3, which="both")


# ---------------------------------------------------------------------------------------------- across tasks
def roles(rows: list[dict], summary: dict) -> list[tuple[str, dict]]:
    """The cells a user asks about, per task: the reference, DDIM-10 (the first thing one tries), the fastest cell
    within the reference's interval, the choice at a 40 ms p95 budget, the most successful and the fastest
    within-interval cached cell, and the most successful warm start."""
    done = {r["label"]: r for r in rows if "success" in r and "latency_ms" in r}
    within = [done[lab] for lab in summary["within_reference"] if lab in done]
    cached = [r for r in done.values() if r["cache"] != "none"]
    warm = [r for r in done.values() if r.get("start")]
    best = lambda rs: max(rs, key=lambda r: (r["success"]["rate"], -r["latency_ms"]["p50"]))  # noqa: E731
    at40 = next((x["label"] for x in summary["recommended"] if x["budget_ms"] == 40), None)
    out = [("reference", done.get(summary["reference"])), ("DDIM-10", done.get("ddim-10")),
           ("fastest within the reference's interval", within[0] if within else None),
           ("chosen for a 40 ms p95 budget", done.get(at40)),
           ("most successful cache", best(cached) if cached else None),
           ("fastest cache within the interval", min((r for r in within if r["cache"] != "none"),
                                                     key=lambda r: r["latency_ms"]["p50"], default=None)),
           ("most successful warm start", best(warm) if warm else None)]
    return [(role, r) for role, r in out if r is not None]


def caches_on_front(rows: list[dict], summary: dict) -> list[str]:
    """Cached or warm-started cells on the Pareto set that no uncached sampler matches: the cells where reuse earns
    its place (an uncached cell at most as slow with at least the success would dominate or tie them)."""
    done = {r["label"]: r for r in rows if "success" in r and "latency_ms" in r}
    plain = [r for r in done.values() if r["cache"] == "none" and not r.get("start")]
    out = []
    for lab in summary["pareto"]:
        r = done[lab]
        if r["cache"] == "none" and not r.get("start"):
            continue
        if not any(p["latency_ms"]["p50"] <= r["latency_ms"]["p50"] and p["success"]["rate"] >= r["success"]["rate"]
                   for p in plain):
            out.append(lab)
    return out


SAME_LATENCY = 1.15  # latencies of two cells within 15% count as equal (the timing noise between cells here)


def beats_uncached(rows: list[dict]) -> list[str]:
    """Cached or warm-started cells strictly better than every uncached sampler. Faster: at least 1.5x below the
    p50 of the fastest uncached cell whose success reaches this cell's lower interval bound (the same success,
    within noise). Or more successful: a success rate above the upper interval bound of every uncached cell at
    most as slow (latencies within ``SAME_LATENCY`` count as equal)."""
    done = [r for r in rows if "success" in r and "latency_ms" in r]
    plain = [r for r in done if r["cache"] == "none" and not r.get("start")]
    out = []
    for r in done:
        if r["cache"] == "none" and not r.get("start"):
            continue
        lat, s = r["latency_ms"]["p50"], r["success"]
        as_good = [p["latency_ms"]["p50"] for p in plain if p["success"]["rate"] >= s["ci95"][0]]
        as_fast = [p["success"]["ci95"][1] for p in plain if p["latency_ms"]["p50"] <= SAME_LATENCY * lat]
        if (as_good and 1.5 * lat <= min(as_good)) or (as_fast and s["rate"] > max(as_fast)):
            out.append(r["label"])
    return out


def tasks_table(frontiers: dict[str, dict]) -> str:
    """The README's summary: per task (``frontiers``: task -> frontier.json), the cells of ``roles`` and the Pareto
    set, with pooled success, latency and the speedup against the reference."""
    lines = ["| task | what | config | success [95% CI] | episodes | p50 / p95 ms | vs reference p50 | |",
             "|---|---|---|---|---|---|---|---|"]
    notes = []
    for task, data in frontiers.items():
        rows, summary = data["rows"], data["summary"]
        ref = next((r for r in rows if r["label"] == summary["reference"] and "latency_ms" in r), None)
        front, within = set(summary["pareto"]), set(summary["within_reference"])
        for role, r in roles(rows, summary):
            s, lat = r["success"], r["latency_ms"]
            speed = f"{ref['latency_ms']['p50'] / lat['p50']:.1f}×" if ref else "-"
            mark = ("★" if r["label"] in front else "") + ("✓" if r["label"] in within else "")
            lines.append(f"| {task} | {role} | {r['label']} | {s['rate']:.2f} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}] | "
                         f"{s['episodes']} | {lat['p50']:.1f} / {lat['p95']:.1f} | {speed} | {mark} |")
        reuse = caches_on_front(rows, summary)
        notes.append(f"- {task}: {summary['n_cells_done']} cells; Pareto set (fastest first) "
                     f"{', '.join(summary['pareto'])}; cached or warm-started cells on it that no uncached sampler "
                     f"matches: {', '.join(reuse) or 'none'}; strictly better than every uncached sampler (success "
                     f"above their intervals at equal latency, or equal success at 1.5x less latency): "
                     f"{', '.join(beats_uncached(rows)) or 'none'}.")
    return "\n".join(lines + [""] + notes) + "\n"


def tasks_plot(frontiers: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(frontiers), figsize=(6 * len(frontiers), 5), squeeze=False)
    for ax, (task, data) in zip(axes[0], frontiers.items()):
        draw(ax, data["rows"], data["summary"], task, labels=False)
        ax.set_title(task)
    legend = {}
    for ax in axes[0]:
        for h, name in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(name, h)
    fig.legend(list(legend.values()), list(legend), fontsize=7, loc="lower center", ncol=min(6, len(legend)))
    fig.suptitle("success against batch-1 latency per action chunk: samplers, step counts, caches, warm starts")
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="the frontiers of several tasks in one table (and one plot)")
    p.add_argument("frontiers", nargs="+", help="docs/frontier/<task> folders (each with frontier.json)")
    p.add_argument("--out", default=None, help="a markdown file to write (default: print)")
    p.add_argument("--section", default=None, help="write between this section's markers in --out")
    p.add_argument("--plot", default=None)
    a = p.parse_args(argv)
    frontiers = {}
    for d in map(Path, a.frontiers):
        f = d / "frontier.json"
        if not f.exists():
            raise FileNotFoundError(f"{f} is missing: run `python eval/frontier.py ... frontier.phase=report` first")
        frontiers[d.name] = json.loads(f.read_text())
    md = tasks_table(frontiers)
    write_out(a.out and Path(a.out), md, a.section)
    if a.plot:
        tasks_plot(frontiers, Path(a.plot))


if __name__ == "__main__":
    main()
