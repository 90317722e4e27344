"""Figures for a calibrated checkpoint and for finished runs (PNG).

    python eval/figures.py heatmaps --checkpoint checkpoints/lift            # per-block similarity heatmaps
    python eval/figures.py step-error --checkpoint checkpoints/lift          # per-step error: block-wise ACS vs BAC
    python eval/figures.py hz-success results/2026-11-25 --out docs/hz_success.png   # from summary.json files
    python eval/figures.py realtime docs/results/realtime --offline docs/results --out docs/figures/realtime.png
    python eval/figures.py frames runs/vid/videos/seed0_success.mp4 runs/vid/videos/seed2_fail.mp4 --out strip.png

The step-error figure runs the uncached sampler on held-out benchmark observations, then feeds each
step's x_k to the cached denoiser and plots its output error at that step (teacher forcing, so the curve
shows the error each step makes, not accumulated drift); FFN update steps of the block-wise schedule are
marked.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402
import matplotlib.ticker  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bac.calibration import Calibration  # noqa: E402
from policies import load_policy  # noqa: E402
from policies.cache_target import calibration_path, disable_cache, enable_cache, make_schedule, policy_signature  # noqa: E402


def heatmaps(checkpoint: Path, metric: str, out: Path) -> Path:
    policy = load_policy(checkpoint)
    scheduler, K, _ = policy_signature(policy)
    calib = Calibration.load(calibration_path(checkpoint, scheduler, K))
    n = len(calib.blocks)
    cols = 6 if n % 6 == 0 else 3
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.3 * rows + 0.5), squeeze=False)
    for ax, block, sim in zip(axes.flat, calib.blocks, calib.sims[metric]):
        im = ax.imshow(sim, cmap="viridis", origin="upper")
        ax.set_title(f"L{block.layer} {block.kind}", fontsize=9)
        ax.set_xticks([0, K - 1])
        ax.set_yticks([0, K - 1])
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{checkpoint.name}: {metric} between block outputs at denoising steps i, j ({scheduler}, K={K})")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(out, dpi=110)
    return out


@torch.no_grad()
def step_errors(policy, schedule, obs) -> np.ndarray:
    """Error of the cached denoiser output at each step k on the *uncached* trajectory's x_k (teacher
    forcing), so each step's value is the caching error made at that step, not an accumulated drift: (K,)."""
    from bac.stepping import fast_step_for

    model, c = policy.model, policy.config
    cond = policy.normalizer.normalize("obs", policy.check_obs(obs))
    obs_tokens = model.encode_obs(cond)
    sched = policy.noise_scheduler
    sched.set_timesteps(c.num_inference_steps)
    memory = model.memory(obs_tokens, model.encode_time(sched.timesteps))  # (K, B, 1 + To, n_emb)
    step = fast_step_for(sched)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cond.shape[0], c.horizon, c.action_dim, generator=g)
    xs, ref = [], []
    for k, t in enumerate(sched.timesteps):
        xs.append(x)
        ref.append(model(x, t, memory=memory[k]))
        x = step(ref[-1], k, x, g)
    engine = enable_cache(policy, schedule)
    errs = []
    try:
        with engine.session(len(xs)):
            for k, t in enumerate(sched.timesteps):
                engine.step(k, t)
                out = model(xs[k], t, memory=memory[k])
                errs.append((out - ref[k]).pow(2).mean().item())
    finally:
        disable_cache(policy, engine)
    return np.array(errs)


def step_error(checkpoint: Path, n_updates: int, n_bubble: int, out: Path) -> Path:
    from eval.common import load_bench_obs

    policy = load_policy(checkpoint)
    obs = load_bench_obs(policy, checkpoint, 8)
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for method, color in [("uniform", "tab:gray"), ("unified_acs", "tab:blue"), ("blockwise_acs", "tab:orange"),
                          ("bac", "tab:green")]:
        err = step_errors(policy, make_schedule(policy, checkpoint, method, n_updates=n_updates, n_bubble=n_bubble), obs)
        ax.semilogy(err + 1e-12, color=color, label=f"{method} (mean {err.mean():.2e})", lw=1.4)
    blockwise = make_schedule(policy, checkpoint, "blockwise_acs", n_updates=n_updates)
    scheduler, K, _ = policy_signature(policy)
    ffn = {b.name for b in Calibration.load(calibration_path(checkpoint, scheduler, K)).blocks if b.kind == "ffn"}
    ffn_steps = sorted({k for b, steps in blockwise.steps.items() if b in ffn for k in steps})
    for k in ffn_steps:
        ax.axvline(k, color="tab:orange", alpha=0.15, lw=1)
    ax.set_xlabel("denoising step k (shaded: FFN update steps of block-wise ACS)")
    ax.set_ylabel("MSE of predicted noise vs uncached\n(same x_k, teacher-forced)")
    ax.set_title(f"{checkpoint.name}: per-step error at S={n_updates} (BAC n={n_bubble})")
    ax.legend(fontsize=7, ncol=2, loc="lower center")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


COLORS = {"none": "black", "uniform": "tab:gray", "unified_acs": "tab:blue", "blockwise_acs": "tab:orange",
          "bac": "tab:green"}


def hz_success(result_dirs: list[Path], out: Path, hz_key: str = "inference_hz", bench_dirs: list[Path] = ()) -> Path:
    """Success (95% CI) against frequency per offline config. With ``bench_dirs`` (eval/bench.py folders), a
    config's inference Hz is its bench latency (one process, interleaved rounds) instead of the latency its own
    rollout process measured, which depends on what else ran then; configs missing from the bench are left out."""
    from eval.report import bench_rows, load, merge_runs, run_key

    summaries = [s for s in merge_runs(load(result_dirs)) if s.get("loop", "offline") == "offline"]  # runs on more seeds: one point
    if bench_dirs:
        bench, hz_key, joined = bench_rows(list(bench_dirs)), "bench_hz", []
        for s in summaries:
            b = bench.get((s["task"], f"{s.get('scheduler')}-{s.get('num_inference_steps')}", run_key(s)))
            if b is not None:
                joined.append(dict(s, bench_hz=1000 / b["latency_ms"]["p50"], device=b["_meta"]["device"]))
        summaries = joined
    if not summaries:
        raise FileNotFoundError(f"no offline summary.json under {[str(d) for d in result_dirs]}"
                                + (f" with a bench row under {[str(d) for d in bench_dirs]}" if bench_dirs else ""))
    tasks = sorted({s["task"] for s in summaries})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for s in sorted((s for s in summaries if s["task"] == task), key=lambda s: s[hz_key]):
            lo, hi = s["success_ci95"]
            sched = (s.get("cache_stats") or {}).get("schedule", {})
            label = s["cache"] + (f" (S={sched['n_updates']}" if sched.get("n_updates") else "")
            if sched.get("n_updates"):
                label += (f", n={sched['n_bubble']})" if s["cache"] == "bac" and sched.get("n_bubble") else ")")
            marker = {1: "o", 5: "s"}.get(sched.get("n_bubble"), "D") if s["cache"] == "bac" else "o"
            ax.errorbar(s[hz_key], s["success_rate"], yerr=[[s["success_rate"] - lo], [hi - s["success_rate"]]],
                        fmt=marker, capsize=4, color=COLORS.get(s["cache"]), label=label, ms=7)
        ax.set_xlim(left=0)
        shown = "inference hz in eval/bench.py" if hz_key == "bench_hz" else hz_key.replace("_", " ")
        ax.set_xlabel(f"{shown}, batch 1 ({summaries[0]['device'].split(',')[0]})")
        episodes = sorted({s["n_episodes"] for s in summaries if s["task"] == task})
        ax.set_ylabel(f"success rate, {'/'.join(map(str, episodes))} episodes (95% CI)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{task}: DDPM-100, offline loop")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def _label(s: dict) -> str:
    sched = (s.get("cache_stats") or {}).get("schedule", {})
    return s["cache"] + (f" S={sched['n_updates']}" if sched.get("n_updates") else "")


def realtime(result_dirs: list[Path], offline_dirs: list[Path], out: Path) -> Path:
    """Inference frequency (batch-1 chunks per second on this device, log scale) against success in the realtime
    loop (filled), with each config's offline success (same cache, S and task; hollow) at the same frequency.
    Each point is labelled with the control Hz the realtime loop achieved (policy actions per world second)."""
    from eval.report import load

    rt = [s for s in load(result_dirs) if s.get("loop") == "realtime"]
    off = {(s["task"], _label(s)): s for s in (load(offline_dirs) if offline_dirs else []) if s.get("loop", "offline") == "offline"}
    if not rt:
        raise FileNotFoundError(f"no realtime summary.json under {[str(d) for d in result_dirs]}")
    tasks = sorted({s["task"] for s in rt})
    fig, axes = plt.subplots(1, len(tasks), figsize=(8.4 * len(tasks), 4.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = sorted((s for s in rt if s["task"] == task), key=lambda s: s["inference_hz"])
        for s in rows:
            lo, hi = s["success_ci95"]
            color = COLORS.get(s["cache"])
            x = s["inference_hz"]
            extra = f", {s['loop_config']['chunk_actions']} queued" if s["loop_config"]["chunk_actions"] != 8 else ""
            ax.errorbar(x, s["success_rate"], yerr=[[s["success_rate"] - lo], [hi - s["success_rate"]]], fmt="o",
                        capsize=4, color=color, ms=7, label=f"{_label(s)}{extra}: ctrl {s['control_hz']:.1f} Hz")
            ax.annotate(_label(s).replace(" ", "\n"), (x, s["success_rate"]), textcoords="offset points", xytext=(6, -14),
                        fontsize=7, color=color)
            ref = off.get((task, _label(s)))
            if ref is not None:
                ax.plot([x, x], [ref["success_rate"], s["success_rate"]], color=color, lw=0.8, ls=":")
                ax.plot(x, ref["success_rate"], marker="o", mfc="none", color=color, ms=10)
        hz = rows[0]["loop_config"]["control_hz"]
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([1, 2, 5, 10, 20, 50])
        ax.set_xlim(0.8, 60)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("inference Hz (1000 / batch-1 latency p50, in-process)")
        ax.set_ylabel(f"success rate, {rows[0]['n_episodes']} episodes (95% CI)")
        device = rows[0]["device"].split(" (")[0]
        ax.set_title(f"{task}: realtime loop at {hz:g} Hz, Ta 8, DDPM-{rows[0]['num_inference_steps']}, {device}\n"
                     "filled: realtime; hollow: same config, offline loop", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def frames(videos: list[Path], out: Path, n_frames: int = 8) -> Path:
    """One row per rollout video (``eval/run.py eval.video=true``): ``n_frames`` frames evenly spaced from the
    first to the last, titled with the video's name and the frame index."""
    import imageio.v2 as imageio

    rows = []
    for v in videos:
        if not v.is_file():
            raise FileNotFoundError(f"no video {v}; make one with eval/run.py ... eval.video=true")
        reader = imageio.get_reader(str(v))
        clip = [np.asarray(f) for f in reader]
        reader.close()
        if not clip:
            raise ValueError(f"video {v} has no frames")
        idx = np.linspace(0, len(clip) - 1, min(n_frames, len(clip))).round().astype(int)
        rows.append((v.stem, idx, [clip[i] for i in idx]))
    cols = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.9 * cols, 2.1 * len(rows)), squeeze=False)
    for r, (name, idx, imgs) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(imgs):
                ax.imshow(imgs[c])
                ax.set_title(f"{name} t={idx[c]}" if c == 0 else f"t={idx[c]}", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("heatmaps")
    h.add_argument("--checkpoint", required=True)
    h.add_argument("--metric", default="cosine")
    h.add_argument("--out", default=None)
    e = sub.add_parser("step-error")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--n-updates", type=int, default=10)
    e.add_argument("--n-bubble", type=int, default=5)
    e.add_argument("--out", default=None)
    z = sub.add_parser("hz-success")
    z.add_argument("results", nargs="+")
    z.add_argument("--out", required=True)
    z.add_argument("--hz", default="inference_hz", choices=["inference_hz", "control_hz"])
    z.add_argument("--bench", nargs="*", default=[], help="eval/bench.py folders: take each config's Hz from there")
    r = sub.add_parser("realtime")
    r.add_argument("results", nargs="+")
    r.add_argument("--offline", nargs="*", default=[], help="folders with the offline runs of the same configs")
    r.add_argument("--out", required=True)
    f = sub.add_parser("frames")
    f.add_argument("videos", nargs="+")
    f.add_argument("--n-frames", type=int, default=8)
    f.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.cmd in ("heatmaps", "step-error"):  # figures of a checkpoint go to docs/figures, never into the checkpoint
        ckpt = Path(a.checkpoint)
        name = f"{ckpt.name}_heatmaps_{a.metric}.png" if a.cmd == "heatmaps" else f"{ckpt.name}_step_error_S{a.n_updates}.png"
        a.out = a.out or str(ROOT / "docs" / "figures" / name)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.cmd == "heatmaps":
        path = heatmaps(ckpt, a.metric, out)
    elif a.cmd == "step-error":
        path = step_error(ckpt, a.n_updates, a.n_bubble, out)
    elif a.cmd == "frames":
        path = frames([Path(v) for v in a.videos], out, a.n_frames)
    elif a.cmd == "realtime":
        path = realtime([Path(x) for x in a.results], [Path(x) for x in a.offline], out)
    else:
        path = hz_success([Path(r) for r in a.results], out, a.hz, [Path(b) for b in a.bench])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
