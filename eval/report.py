"""Collect ``summary.json`` files of finished runs into one markdown table.

    python eval/report.py results/issue --out docs/results.md

Rows are grouped by task and sorted by cache method; the uncached row of each task is the reference
for the latency ratio column.
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


def table(rows: list[dict]) -> str:
    head = ("| task | cache | S | n | episodes | success [95% CI] | latency p50 / p95 ms | vs none | inference Hz "
            "| control Hz | FLOPs ratio | device |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for task in sorted({r["task"] for r in rows}):
        group = [r for r in rows if r["task"] == task]
        group.sort(key=lambda r: (ORDER.index(r["cache"]) if r["cache"] in ORDER else 99,
                                  (r.get("cache_stats") or {}).get("schedule", {}).get("n_updates") or 0))
        base = next((r["latency_ms"]["p50"] for r in group if r["cache"] == "none"), None)
        for r in group:
            sched = (r.get("cache_stats") or {}).get("schedule", {})
            lo, hi = r["success_ci95"]
            ratio = f"{base / r['latency_ms']['p50']:.2f}x" if base else "-"
            lines.append(
                f"| {task} | {r['cache']} | {sched.get('n_updates') or '-'} | {sched.get('n_bubble') or '-'} "
                f"| {r['n_episodes']} | {r['success_rate']:.2f} [{lo:.2f}, {hi:.2f}] "
                f"| {r['latency_ms']['p50']:.0f} / {r['latency_ms']['p95']:.0f} | {ratio} | {r['inference_hz']:.2f} "
                f"| {r['control_hz']:.2f} | {r.get('flops_ratio', 1.0):.3f} | {r['device']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    md = table(load([Path(r) for r in a.results]))
    print(md)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(md)


if __name__ == "__main__":
    main()
