"""Train a transformer Diffusion Policy on a robomimic-layout hdf5 file.

    python eval/train.py --dataset data/lift.hdf5 --out checkpoints/lift --steps 12000

Saves the EMA weights (the ones evaluated) with config, normalizer and a training record every
``--save-every`` steps; the full training state (weights, EMA, optimizer, step, RNG) goes to
``train_state.pt`` so an interrupted run continues with ``--resume``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tqdm import tqdm  # noqa: E402

from policies import DiffusionTransformerPolicy, DPTConfig, Normalizer, save_policy  # noqa: E402
from policies.data import default_obs_keys, file_sha256, load_demos, make_windows  # noqa: E402


class EMA:
    """Exponential moving average of weights with Diffusion Policy's warm-up: decay = 1 - (1 + step)^-0.75."""

    def __init__(self, model: torch.nn.Module, power: float = 0.75, max_decay: float = 0.9999):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.power, self.max_decay = power, max_decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = 0.0 if step <= 0 else min(self.max_decay, 1 - (1 + step) ** -self.power)
        ema_params = list(self.model.parameters())
        torch._foreach_mul_(ema_params, decay)  # one fused kernel per dtype/device instead of one per tensor
        torch._foreach_add_(ema_params, [p.detach() for p in model.parameters()], alpha=1 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (Linear and attention projections); none on biases, norms and position embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "pos_emb" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, base_lr: float, warmup: int) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def steps_for_budget(budget_s: float, spent_s: float, probe_steps: int, probe_s: float, done: int, cap: int) -> int:
    """Total steps that end training within ``budget_s``, from the rate measured over ``probe_steps`` steps.

    Keeps 5% of the remaining time for saving; never fewer steps than are already done, never more than ``cap``.
    """
    rate = probe_steps / max(probe_s, 1e-9)
    more = int(0.95 * max(0.0, budget_s - spent_s) * rate)
    return max(done, min(cap, done + more))


def build_policy(args, obs_keys: list[str], obs_dims: list[int], action_dim: int) -> DiffusionTransformerPolicy:
    config = DPTConfig(
        obs_keys=obs_keys,
        obs_dims=obs_dims,
        action_dim=action_dim,
        horizon=args.horizon,
        n_obs_steps=args.n_obs_steps,
        n_action_steps=args.n_action_steps,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_emb=args.n_emb,
        p_drop_attn=args.p_drop_attn,
    )
    return DiffusionTransformerPolicy(config)


def obs_dims_of(path: Path, obs_keys: list[str]) -> list[int]:
    import h5py

    with h5py.File(path, "r") as f:
        first = next(iter(f["data"].values()))
        return [int(np.prod(first["obs"][k].shape[1:])) for k in obs_keys]


ARCH_FIELDS = ("obs_keys", "obs_dims", "action_dim", "horizon", "n_obs_steps", "n_layer", "n_head", "n_emb", "causal_attn")


def init_source(directory: str | Path, ours: dict, fields: tuple[str, ...]) -> tuple[Path, dict]:
    """Check an ``--init-from`` folder: its weights and config exist and its config matches ``ours`` on ``fields``
    (named in the error otherwise). Returns the folder and its training record ({} if it has none)."""
    d = Path(directory)
    for name in ("config.json", "model.safetensors"):
        if not (d / name).exists():
            raise FileNotFoundError(f"--init-from {d}: {d / name} is missing")
    source = json.loads((d / "config.json").read_text())
    diff = {k: (source.get(k), ours[k]) for k in fields if source.get(k) != ours[k]}
    if diff:
        raise ValueError(f"--init-from {d} does not match this run: " + ", ".join(f"{k} {a} there, {b} here" for k, (a, b) in diff.items()))
    rec_path = d / "train_record.json"
    return d, json.loads(rec_path.read_text()) if rec_path.exists() else {}


def init_weights(policy: DiffusionTransformerPolicy, directory: str | Path) -> dict:
    """Start from another checkpoint's (EMA) weights, e.g. one trained on an earlier dataset of the same task.

    The architecture and observation layout must match; the normalizer is the new dataset's. Returns the
    provenance kept in the training record (the source folder, its steps and its dataset hash).
    """
    d, rec = init_source(directory, policy.config_dict(), ARCH_FIELDS)
    policy.load_state_dict(load_file(str(d / "model.safetensors")))
    return {"checkpoint": str(d), "steps": rec.get("steps"), "dataset_sha256": rec.get("dataset_sha256"), "commands": rec.get("commands")}


def train(args: argparse.Namespace) -> Path:
    torch.set_num_threads(args.threads)
    from eval.common import device_name, pick_device

    device = pick_device(args.device)
    if args.time_budget_s is not None and args.time_budget_s <= 0:
        raise ValueError(f"--time-budget-s must be positive, got {args.time_budget_s}")
    out = Path(args.out)
    state_path = out / "train_state.pt"
    if out.exists() and any(out.iterdir()) and not (args.resume or args.overwrite):
        raise FileExistsError(f"{out} already holds a checkpoint; pass --resume to continue it or --overwrite to replace it")
    dataset = Path(args.dataset)
    obs_keys = args.obs_keys or default_obs_keys(dataset)
    _, demos = load_demos(dataset, obs_keys)
    obs_w, act_w = make_windows(demos, args.horizon, args.n_obs_steps, args.n_action_steps)
    all_obs = np.concatenate([d["obs"] for d in demos])
    all_act = np.concatenate([d["actions"] for d in demos])
    normalizer = Normalizer.fit({"obs": all_obs, "action": all_act})
    nobs = normalizer.normalize("obs", torch.from_numpy(obs_w)).to(device)  # (N, To, Do)
    nact = normalizer.normalize("action", torch.from_numpy(act_w)).to(device)  # (N, T, Da)

    torch.manual_seed(args.seed)
    policy = build_policy(args, obs_keys, obs_dims_of(dataset, obs_keys), act_w.shape[-1])
    policy.set_normalizer(normalizer)
    init_record = init_weights(policy, args.init_from) if args.init_from and not (args.resume and state_path.exists()) else None
    policy.to(device)
    ema = EMA(policy)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(optimizer_groups(policy.model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), **fused)
    gen = torch.Generator().manual_seed(args.seed)
    step, curve, elapsed = 0, [], 0.0
    total_steps = args.steps  # lowered once by --time-budget-s after the probe (a resume probes its own budget)
    if args.resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        policy.load_state_dict(state["policy"])
        ema.model.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step, curve, elapsed = state["step"], state["curve"], state["elapsed"]
        print(f"resumed {out} at step {step}")
    ema.model.set_normalizer(normalizer)

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv) if args.command is None else args.command
    previous = out / "train_record.json"
    commands = json.loads(previous.read_text()).get("commands", []) if args.resume and previous.exists() else []
    record = {
        "command": command,
        "commands": commands + [f"{command}  # from step {step}"],  # every invocation, resumes included
        "dataset": str(dataset),
        "dataset_sha256": file_sha256(dataset),
        "n_demos": len(demos),
        "n_windows": int(len(nact)),
        "obs_keys": obs_keys,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "torch": torch.__version__,
        "device": device_name(device),
    }
    if args.time_budget_s is not None:
        record["time_budget_s"] = args.time_budget_s
    if init_record is not None:
        record["init_from"] = init_record
    elif args.resume and previous.exists() and "init_from" in json.loads(previous.read_text()):
        record["init_from"] = json.loads(previous.read_text())["init_from"]

    def save() -> None:
        rec = dict(record, steps=step, total_steps=total_steps, wall_time_s=round(elapsed, 1), loss_curve=curve, final_loss=curve[-1][1] if curve else None)
        save_policy(ema.model, out, rec)
        torch.save(
            {
                "policy": policy.state_dict(),
                "ema": ema.model.state_dict(),
                "optimizer": opt.state_dict(),
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "step": step,
                "curve": curve,
                "elapsed": elapsed,
            },
            state_path.with_suffix(".tmp"),
        )
        os.replace(state_path.with_suffix(".tmp"), state_path)

    policy.train()
    bar = tqdm(total=total_steps, initial=step, desc=f"train {out.name}", disable=args.quiet, mininterval=2.0)
    t_last = time.time()
    # The budget is resolved from the rate over steps [start + 20, start + probe): the first steps pay for
    # allocation and kernel selection. Warm-up must outlast the probe so the cosine schedule is set before it bends.
    probe = min(200, max(40, args.warmup)) if args.time_budget_s is not None else None
    start, probe_t0, spent_at_start = step, None, elapsed
    loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
    n_sum = 0
    while step < total_steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total_steps, args.lr, args.warmup)
        idx = torch.randint(0, len(nact), (args.batch_size,), generator=gen).to(device, non_blocking=True)
        loss = policy.compute_loss(nobs[idx], nact[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(policy, step)
        loss_sum += loss.detach()
        n_sum += 1
        step += 1
        now = time.time()
        elapsed += now - t_last
        t_last = now
        if probe is not None and step in (start + 20, start + probe):
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # time what the device did, not what was queued
            now = time.time()
            if step == start + 20:
                probe_t0 = now
            elif step == start + probe:
                total_steps = steps_for_budget(args.time_budget_s, elapsed - spent_at_start, probe - 20, now - probe_t0, step, args.steps)
                bar.total = total_steps
                bar.write(f"--time-budget-s {args.time_budget_s:g}: {(probe - 20) / (now - probe_t0):.1f} steps/s -> {total_steps} steps")
                probe = None
        if args.time_budget_s is not None and elapsed - spent_at_start > args.time_budget_s and step < total_steps:
            bar.write(f"--time-budget-s {args.time_budget_s:g} spent at step {step} of {total_steps}; saving")
            total_steps = step
        if step % 100 == 0 or step == total_steps:
            curve.append([step, float(loss_sum.item() / n_sum)])
            loss_sum.zero_()
            n_sum = 0
            bar.set_postfix(loss=f"{curve[-1][1]:.4f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
        bar.update(1)
        if step % args.save_every == 0 or step == total_steps:
            save()
    bar.close()
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="robomimic-layout hdf5 file")
    p.add_argument("--out", required=True, help="checkpoint folder")
    p.add_argument("--obs-keys", nargs="+", default=None, help="default: robomimic low-dim keys if present, else all")
    p.add_argument("--steps", type=int, default=12000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--weight-decay", type=float, default=1e-3)
    p.add_argument("--horizon", type=int, default=16)
    p.add_argument("--n-obs-steps", type=int, default=2)
    p.add_argument("--n-action-steps", type=int, default=8)
    p.add_argument("--n-layer", type=int, default=8)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-emb", type=int, default=128)
    p.add_argument("--p-drop-attn", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads; keep 1 when anything else runs")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (cuda when torch sees one)")
    p.add_argument(
        "--time-budget-s", type=float, default=None,
        help="train for about this many seconds: the step rate over the first steps sets the total (at most --steps), "
        "so the cosine schedule ends when the time does",
    )
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--init-from", default=None, help="checkpoint folder whose weights start this run (same architecture)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/train_state.pt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint folder")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--command", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    train(parse_args())
