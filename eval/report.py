"""Collect ``summary.json`` files of finished runs into one markdown table.

    python eval/report.py results/issue --out docs/results.md

Rows are grouped by task and sorted by cache method. Latencies come from separate processes, so they
are not compared here: speedups against ``cache=none`` are eval/bench.py's job (one process, interleaved).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ORDER = ["none", "uniform", "unified_acs", "blockwise_acs", "bac"]


def load(dirs: list[Path]) -> list[dict]:
    rows = [json.loads(p.read_text()) | {"_path": str(p.parent)} for d in dirs for p in sorted(d.rglob("summary.json"))]
    if not rows:
        raise FileNotFoundError(f"no summary.json under {[str(d) for d in dirs]}")
    return rows


def _order(r: dict):
    return (ORDER.index(r["cache"]) if r["cache"] in ORDER else 99,
            (r.get("cache_stats") or {}).get("schedule", {}).get("n_updates") or 0)


def realtime_table(rows: list[dict]) -> str:
    """Realtime-loop runs: success next to what the loop did (misses, stale actions, action age)."""
    rows = [r for r in rows if r.get("loop") == "realtime"]
    if not rows:
        return ""
    head = ("| task | cache | S | n | queued | episodes | success [95% CI] | latency p50 / p95 / p99 ms | control Hz "
            "| misses / episode | stale dropped / episode | action age ms | FLOPs ratio |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for task in sorted({r["task"] for r in rows}):
        for r in sorted((r for r in rows if r["task"] == task), key=lambda r: (_order(r), r["loop_config"]["chunk_actions"])):
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


def table(rows: list[dict]) -> str:
    rows = [r for r in rows if r.get("loop", "offline") == "offline"]
    if not rows:
        return ""
    head = ("| task | cache | S | n | episodes | success [95% CI] | latency p50 / p95 ms | inference Hz "
            "| control Hz | FLOPs ratio | device |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for task in sorted({r["task"] for r in rows}):
        group = [r for r in rows if r["task"] == task]
        group.sort(key=_order)
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


def bench_table(dirs: list[Path]) -> str:
    """One markdown table of every bench.json under ``dirs`` (eval/bench.py output)."""
    lines = ["| task | config | latency p50 / p95 ms | speedup vs none | FLOPs ratio | speedup / FLOPs ceiling "
             "| action MSE | device |", "|---|---|---|---|---|---|---|---|"]
    for path in sorted(p for d in dirs for p in d.rglob("bench.json")):
        b = json.loads(path.read_text())
        for r in b["rows"]:
            lines.append(f"| {b['meta']['task']} | {r['config']} | {r['latency_ms']['p50']:.0f} / "
                         f"{r['latency_ms']['p95']:.0f} | {r['speedup']:.2f}x | {r['flops_ratio']:.3f} "
                         f"| {r['speedup_vs_flops']:.2f} | {r['action_mse']:.2e} | {r['device']} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    dirs = [Path(r) for r in a.results]
    rows = load(dirs)
    md = table(rows)
    rt = realtime_table(rows)
    if rt:
        md += ("\nRealtime loop (the simulated world runs at its control rate while the policy computes; "
               "asynchronous inference, stale actions dropped, hold on a miss):\n\n" + rt)
    bench = bench_table(dirs)
    if bench:
        md += "\nBenchmark (eval/bench.py: one process, interleaved rounds, batch 1):\n\n" + bench
    print(md)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(md)


if __name__ == "__main__":
    main()
