"""The generation table and its Pareto plot: every ``eval/generate.py`` run under the given folders, one row each.

    python eval/generate_report.py docs/dit_image --out docs/dit_image.md --section table \
        --plot docs/figures/dit_image_pareto.png

Per row: speedup at each timed batch size (against ``cache=none`` in the same process), FLOPs ratio, PSNR,
SSIM and rel-L2 against the uncached samples from identical noise, and the digit classifier's accuracy and
Fréchet distance (FD) of the cached samples, and their change against the uncached samples with paired standard
errors ("same dist.": both changes within 2 se). Rows are engine methods (``bac.methods``) or peers (another
library's cache, or fewer sampler steps: what a user would pick instead). ``front`` marks the rows no other
row beats in both speedup (at the largest batch) and PSNR; under the table, each peer is compared with the
best engine row at no lower PSNR. The plot puts speedup against PSNR, accuracy and FD.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval.common import write_out  # noqa: E402

PEER_PREFIXES = ("fewer_steps", "diffusers_", "cachedit_")  # eval/peers.py's names


def is_peer(row: dict) -> bool:
    return row["method"].startswith(PEER_PREFIXES)


def load(dirs: list[Path]) -> list[dict]:
    """Rows from every summary.json under ``dirs`` (sorted by folder name); unreadable ones are named and skipped."""
    rows = []
    for d in dirs:
        bench = json.loads((Path(d) / "latency.json").read_text()) if (Path(d) / "latency.json").exists() else None
        for path in sorted(Path(d).rglob("summary.json")):
            try:
                s = json.loads(path.read_text())
                row = {"row": path.parent.name, "method": s["cache"]["name"], "summary": s, "timed": "run",
                       "speedup": {int(k): v for k, v in s["speedup"].items()}}
            except (OSError, ValueError, KeyError, TypeError) as e:
                print(f"skipping {path}: not a generate summary ({type(e).__name__}: {e})", file=sys.stderr)
                continue
            if bench is not None:  # eval/generate_bench.py: every row against one baseline, back to back
                timed = {int(b): (1.0 if row["method"] == "none" else v[row["row"]])
                         for b, v in bench["speedup"].items() if row["method"] == "none" or row["row"] in v}
                if timed:  # (a row run after the bench keeps its own timing)
                    row["speedup"], row["timed"] = timed, "bench"
            rows.append(row)
    if not rows:
        raise SystemExit(f"no generate summary.json under {[str(d) for d in dirs]}")
    return rows


def timed_batches(rows: list[dict]) -> list[int]:
    """The batch sizes every row was timed at, ascending."""
    return sorted(set.intersection(*(set(r["speedup"]) for r in rows)))


def front(rows: list[dict], batch: int) -> set[str]:
    """Rows that no other row beats in both speedup at ``batch`` and PSNR (ties kept)."""
    def beats(a, b):
        sa, sb = a["speedup"][batch], b["speedup"][batch]
        pa, pb = a["summary"]["psnr_db"], b["summary"]["psnr_db"]
        return sa >= sb and pa >= pb and (sa > sb or pa > pb)

    return {r["row"] for r in rows if not any(beats(o, r) for o in rows if o is not r)}


def table(rows: list[dict]) -> str:
    batches = timed_batches(rows)
    top = batches[-1]
    on_front = front(rows, top)
    head = (["row", "kind", *(f"speedup b{b}" for b in batches), "FLOPs", "PSNR dB", "SSIM", "rel-L2", "acc", "FD",
             "Δacc ± se", "ΔFD ± se", "same dist.", f"front (b{top})"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (is_peer(r), -r["speedup"][top])):
        s = r["summary"]
        c = s.get("classifier", {}).get("cached", {})
        lines.append("| " + " | ".join([
            r["row"], "peer" if is_peer(r) else "engine", *(f"{r['speedup'][b]:.2f}x" for b in batches),
            f"{s['flops_ratio']:.3f}", f"{s['psnr_db']:.1f}", f"{s['ssim']:.3f}", f"{s['rel_l2']:.3f}",
            f"{c.get('accuracy', float('nan')):.3f}", f"{c.get('fd', float('nan')):.2f}", *change_cells(s),
            "*" if r["row"] in on_front else ""]) + " |")
    first = rows[0]["summary"]
    u = first.get("classifier", {})
    timed = sorted({r["timed"] for r in rows})
    how = {("bench",): "speedups from eval/generate_bench.py (every row and cache=none timed back to back in one process)",
           ("run",): "speedups from each run's own timing"}.get(tuple(timed), "speedups from eval/generate_bench.py, "
                                                                   "except rows run after it (their own timing)")
    notes = [f"\nK = {first['K']} ({first['scheduler']}), {first['n_samples']} samples per row, {how}, "
             f"{first.get('threads', '?')} thread(s), {first['device']}; uncached: accuracy "
             f"{u.get('uncached', {}).get('accuracy', float('nan')):.3f}, FD {u.get('uncached', {}).get('fd', float('nan')):.2f} "
             f"(real training data: FD {u.get('fd_real_train', float('nan')):.2f})."]
    notes += [peer_line(rows, top, b) for b in batches]
    return "\n".join(lines + notes) + "\n"


def within_noise(summary: dict) -> bool | None:
    """Accuracy and FD both within 2 paired standard errors of the uncached samples' (None: not measured)."""
    c = summary.get("classifier", {}).get("change")
    if not c:
        return None
    return abs(c["accuracy"]) <= 2 * c["accuracy_se"] and abs(c["fd"]) <= 2 * c["fd_se"]


def change_cells(summary: dict) -> list[str]:
    c = summary.get("classifier", {}).get("change")
    if not c:
        return ["", "", ""]
    same = within_noise(summary)
    return [f"{c['accuracy']:+.3f} ± {c['accuracy_se']:.3f}", f"{c['fd']:+.2f} ± {c['fd_se']:.2f}", "yes" if same else "no"]


def peer_line(rows: list[dict], top: int, batch: int) -> str:
    """Each peer against the fastest engine row at no lower PSNR, at ``batch``."""
    engine = [r for r in rows if not is_peer(r) and r["method"] != "none"]
    parts = []
    for p in sorted((r for r in rows if is_peer(r)), key=lambda r: r["row"]):
        psnr = p["summary"]["psnr_db"]
        ok = [r for r in engine if r["summary"]["psnr_db"] >= psnr]
        if not ok:
            parts.append(f"{p['row']} ({p['speedup'][batch]:.2f}x, {psnr:.1f} dB): no engine row reaches its PSNR")
            continue
        best = max(ok, key=lambda r: r["speedup"][batch])
        verdict = "ahead" if best["speedup"][batch] > p["speedup"][batch] else "behind"
        parts.append(f"{p['row']} {p['speedup'][batch]:.2f}x at {psnr:.1f} dB: engine {verdict} "
                     f"({best['row']} {best['speedup'][batch]:.2f}x at {best['summary']['psnr_db']:.1f} dB)")
    if not parts:
        return ""
    return f"\nBatch {batch}, each peer against the fastest engine row at no lower PSNR: " + "; ".join(parts) + "."


def plot(rows: list[dict], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = timed_batches(rows)[-1]
    on_front = front(rows, top)
    metrics = [("psnr_db", "PSNR vs uncached (dB)"), ("accuracy", "classifier accuracy"), ("fd", "FD (lower is better)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, (key, label) in zip(axes, metrics):
        for r in rows:
            s = r["summary"]
            y = s[key] if key == "psnr_db" else s.get("classifier", {}).get("cached", {}).get(key)
            if y is None:
                continue
            y = min(y, 60.0) if key == "psnr_db" else y  # identical (100 dB) drawn at the top
            peer = is_peer(r)
            ax.scatter(r["speedup"][top], y, marker="s" if peer else "o", s=36,
                       color="tab:orange" if peer else ("tab:blue" if r["row"] in on_front else "tab:gray"))
            if r["row"] in on_front or r["method"] == "fewer_steps":  # the rest unlabelled: the table names them
                ax.annotate(r["row"], (r["speedup"][top], y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        if key == "psnr_db":
            ax.axhline(30, color="k", lw=0.6, ls=":")
            ax.axvline(3, color="k", lw=0.6, ls=":")
        ax.set_xlabel(f"speedup at batch {top} (vs uncached, same process)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{title}: engine (circles; blue: Pareto front) and peers (orange squares); labelled: the "
                      "front and fewer steps", fontsize=8, loc="left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", type=Path, help="folders holding generate runs (one subfolder per row)")
    p.add_argument("--out", default=None, help="a markdown file (default: print)")
    p.add_argument("--section", default=None, help="write between <!-- NAME:start/end --> markers in --out")
    p.add_argument("--plot", default=None, help="a PNG path for the Pareto plot")
    a = p.parse_args(argv)
    rows = load(a.dirs)
    md = table(rows)
    write_out(a.out and Path(a.out), md, a.section)
    if a.plot:
        print(f"wrote {plot(rows, Path(a.plot), a.dirs[0].name)}")


if __name__ == "__main__":
    main()
