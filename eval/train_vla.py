"""Train the VLA (policies/vla.py) on language-conditioned demos with camera images (eval/collect.py --language
--cameras ...), one multi-task checkpoint over every dataset given.

    python eval/train_vla.py --datasets data/lang/nut_assembly.hdf5 data/lang/pick_place.hdf5 \\
        --out checkpoints/vla --time-budget-s 3600

Windows are Diffusion Policy's (the first step repeated To - 1 times before a demo, the last Ta - 1 times after
it), sampled uniformly over all demos of all files; every image is randomly shifted by up to ``--shift`` pixels
(replicate padding, then a crop: the augmentation of DrQ and robomimic). The state and actions are normalized
to [-1, 1] on the data; the text encoder is frozen and each demo's instruction is encoded once.

``--object-tokens``: each object of the scene is its own prefix token (``object_<name>``, envs/objects.py: the
file's ``object`` split by the task named in its ``env_args``), so the tasks of a multi-task run share the tokens
of the objects they share (the can of Can and of PickPlace); leave ``object`` out of ``--state-keys`` then.

Writes model.safetensors (EMA weights), config.json, normalizer.json, train_record.json (datasets and their
sha256, steps, loss curve, wall time, the command), manifest.json, and calibration/calib_obs.npz (observation
windows of the first demos, the instruction included: what the calibrated cache methods sample over).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from bac.files import file_sha256  # noqa: E402
from envs.objects import object_widths, split_objects, task_of_file  # noqa: E402
from envs.recorder import demo_names  # noqa: E402
from eval.train import EMA, init_source, lr_at, optimizer_groups, steps_for_budget  # noqa: E402
from policies import Normalizer, save_policy  # noqa: E402
from policies.cache_target import calib_obs_path  # noqa: E402
from policies.text_encoder import TEXT_ENCODERS  # noqa: E402
from policies.vla import VLAConfig, VLAPolicy  # noqa: E402


class LanguageDemos:
    """Every demo of the files in memory: images (L, H, W, 3) uint8 per camera, state (L, Ds), actions (L, Da),
    the instruction; ``batch`` draws training windows."""

    def __init__(self, paths: list[str], config: VLAConfig):
        self.config, self.demos = config, []
        for file_index, path in enumerate(paths):
            if not Path(path).exists():
                raise FileNotFoundError(f"dataset {path} does not exist; make it with `python eval/collect.py --task "
                                        f"<task> --language --cameras {','.join(config.cameras)} --out {path}`")
            with h5py.File(path, "r") as f:
                task = task_of_file(f["data"].attrs.get("env_args", "{}")) if config.object_keys else None
                for name in demo_names(f["data"]):
                    g = f["data"][name]
                    instruction = g.attrs.get("instruction")
                    if instruction is None:
                        raise ValueError(f"{path}:{name} has no instruction; collect with --language")
                    keys = [f"{c}_image" for c in config.cameras] + list(config.state_keys)
                    missing = [k for k in keys if k not in g["obs"]]
                    if missing:
                        raise KeyError(f"{path}:{name} lacks observation keys {missing}; it has {sorted(g['obs'])}")
                    images = {c: g["obs"][f"{c}_image"][()] for c in config.cameras}
                    size = next(iter(images.values())).shape[1]
                    if size != config.image_size:
                        raise ValueError(f"{path}:{name} holds {size} px images; the policy is configured for "
                                         f"{config.image_size} (--image-size)")
                    parts = [g["obs"][k][()].reshape(len(g["actions"]), -1) for k in config.state_keys]
                    parts = [np.pad(x, ((0, 0), (0, dim - x.shape[1]))) if k in config.padded_state_keys else x
                             for k, dim, x in zip(config.state_keys, config.state_dims, parts)]
                    state = np.concatenate(parts, -1)
                    objects, present = self._objects(g, task, len(g["actions"]), f"{path}:{name}")
                    self.demos.append({"images": images, "state": state.astype(np.float32),
                                       "objects": objects, "present": present,
                                       "actions": g["actions"][()].astype(np.float32),
                                       "instruction": str(instruction), "source": f"{path}:{name}",
                                       "file": file_index})
        if not self.demos:
            raise ValueError(f"no demos in {paths}")
        c = config
        pad = (c.n_obs_steps - 1) + (c.n_action_steps - 1)
        # (demo, window start in padded coordinates), every window of every demo
        self.windows = np.array([(i, s) for i, d in enumerate(self.demos)
                                 for s in range(len(d["actions"]) + pad - c.horizon + 1)])
        self.window_file = np.array([self.demos[i]["file"] for i in self.windows[:, 0]])
        self.n_files = len(paths)

    def _objects(self, g, task: str | None, length: int, source: str) -> tuple[np.ndarray, np.ndarray]:
        """The demo's objects side by side in ``object_keys`` order (L, sum of object_dims; zeros for the objects
        its task lacks) and which it has (n_objects,) bool: the per-object keys if the file holds them, else its
        ``object`` split by task."""
        c = self.config
        if not c.object_keys:
            return np.zeros((length, 0), np.float32), np.zeros(0, bool)
        if all(k in g["obs"] for k in object_widths(task)):
            mine = {k: g["obs"][k][()] for k in object_widths(task)}
        elif "object" in g["obs"]:
            mine = split_objects(task, g["obs"]["object"][()])
        else:
            raise KeyError(f"{source} holds neither 'object' nor the per-object keys of {task}")
        unknown = sorted(set(mine) - set(c.object_keys))
        if unknown:
            raise ValueError(f"{source} holds objects {unknown} the policy has no token for ({c.object_keys})")
        out = np.zeros((length, sum(c.object_dims)), np.float32)
        present = np.zeros(len(c.object_keys), bool)
        for j, (start, key, dim) in enumerate(zip(np.cumsum([0, *c.object_dims]), c.object_keys, c.object_dims)):
            if key in mine:
                out[:, start: start + dim], present[j] = mine[key], True
        return out, present

    def object_obs(self, objects: np.ndarray, present: np.ndarray) -> dict[str, np.ndarray]:
        """Objects side by side (B, To, sum of object_dims) and presence (B, n_objects) -> the observation keys the
        policy reads (``VLAPolicy.check_objects``): one per object, plus ``object_present``."""
        c = self.config
        ends = np.cumsum(c.object_dims)
        obs = {k: objects[..., end - dim: end] for k, dim, end in zip(c.object_keys, c.object_dims, ends)}
        obs["object_present"] = present.astype(bool)
        return obs

    def sample(self, n: int, generator: torch.Generator, by: str = "window",
               file_weights: list[float] | None = None) -> np.ndarray:
        """``n`` window indices: uniform over all windows (``by="window"``: a file weighs as much as its demos'
        length), or a file and then a window in it (``by="file"``: every task of a multi-task run gets the same
        share of the batches, however long or many its demos; ``file_weights``, one per file, make the shares
        proportional to them instead: a task that a mixed run learns more slowly can get more of the batches)."""
        if by == "window":
            if file_weights is not None:
                raise ValueError("file weights need sampling by file (--sample-by file)")
            return torch.randint(0, len(self.windows), (n,), generator=generator).numpy()
        if by != "file":
            raise ValueError(f"sample by 'window' or 'file', got {by!r}")
        if file_weights is None:
            files = torch.randint(0, self.n_files, (n,), generator=generator).numpy()
        else:
            w = torch.as_tensor(file_weights, dtype=torch.float64)
            if len(w) != self.n_files or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"file weights must be {self.n_files} non-negative numbers (one per dataset, "
                                 f"not all zero), got {list(file_weights)}")
            files = torch.multinomial(w, n, replacement=True, generator=generator).numpy()
        out = np.empty(n, dtype=np.int64)
        for f in np.unique(files):
            pool = np.flatnonzero(self.window_file == f)
            pick = torch.randint(0, len(pool), (int((files == f).sum()),), generator=generator).numpy()
            out[files == f] = pool[pick]
        return out

    def normalizer(self) -> Normalizer:
        """Limits of the state, the actions and each object key (over the demos that hold it)."""
        data = {"state": np.concatenate([d["state"] for d in self.demos]),
                "action": np.concatenate([d["actions"] for d in self.demos])}
        c = self.config
        ends = np.cumsum(c.object_dims)
        for j, (key, dim, end) in enumerate(zip(c.object_keys, c.object_dims, ends)):
            rows = [d["objects"][:, end - dim: end] for d in self.demos if d["present"][j]]
            if not rows:
                raise ValueError(f"no demo holds object {key!r}")
            data[key] = np.concatenate(rows)
        return Normalizer.fit(data)

    def window(self, i: int, s: int) -> dict:
        """Observation window (To steps) and action chunk (T steps) of demo i at padded start s."""
        c, d = self.config, self.demos[i]
        L = len(d["actions"])
        steps = np.clip(np.arange(s, s + c.horizon) - (c.n_obs_steps - 1), 0, L - 1)  # (T,)
        obs_steps = steps[: c.n_obs_steps]
        out = {f"{cam}_image": d["images"][cam][obs_steps] for cam in c.cameras}
        out.update(state=d["state"][obs_steps], actions=d["actions"][steps], instruction=d["instruction"],
                   objects=d["objects"][obs_steps], present=d["present"])
        return out

    def calibration_obs(self, n: int = 16) -> dict[str, np.ndarray]:
        """The middle window of ``n`` demos (the first of each file in turn) as the policy's observation keys (state
        split back per key, the instruction per step): what the calibrated cache methods sample over."""
        c = self.config
        # the first demos of every file in turn, so a multi-task checkpoint is calibrated on all its tasks
        per_file = [[i for i, d in enumerate(self.demos) if d["file"] == f] for f in range(self.n_files)]
        order = [demos[k] for k in range(max(map(len, per_file))) for demos in per_file if k < len(demos)]
        rows = [np.flatnonzero(self.windows[:, 0] == i) for i in order[:n]]
        b = self.batch(np.array([r[len(r) // 2] for r in rows]))
        obs = {f"{cam}_image": b[f"{cam}_image"] for cam in c.cameras}
        ends = np.cumsum(c.state_dims)
        obs.update({k: b["state"][..., end - dim: end] for k, dim, end in zip(c.state_keys, c.state_dims, ends)})
        if c.object_keys:
            obs.update(self.object_obs(b["objects"], b["present"]))
        obs["instruction"] = np.array([[t] * c.n_obs_steps for t in b["instruction"]])
        return obs

    def batch(self, idx: np.ndarray) -> dict:
        items = [self.window(*self.windows[j]) for j in idx]
        out = {k: np.stack([it[k] for it in items]) for k in items[0] if k != "instruction"}
        out["instruction"] = [it["instruction"] for it in items]
        return out


def peek(path: str, state_keys: list[str]) -> tuple[list[int], int]:
    """(dimension of each state key, action dimension) of the first demo of ``path``."""
    if not Path(path).exists():
        raise FileNotFoundError(f"dataset {path} does not exist; make it with `python eval/collect.py --task <task> "
                                "--language --cameras agentview,robot0_eye_in_hand --out <path>`")
    with h5py.File(path, "r") as f:
        names = demo_names(f["data"])
        if not names:
            raise ValueError(f"{path} holds no demos")
        g = f["data"][names[0]]
        missing = [k for k in state_keys if k not in g["obs"]]
        if missing:
            raise KeyError(f"{path} lacks state keys {missing}; it has {sorted(g['obs'])} (--state-keys)")
        return [int(np.prod(g["obs"][k].shape[1:])) for k in state_keys], int(g["actions"].shape[1])


def state_layout(paths: list[str], state_keys: list[str]) -> tuple[list[int], list[str], int]:
    """(width of each state key, the keys zero-padded because the datasets disagree on their width, action
    dimension) over every dataset: a multi-task checkpoint's state token takes the widest of each key."""
    layouts = {p: peek(p, state_keys) for p in paths}
    action_dims = {a for _, a in layouts.values()}
    if len(action_dims) > 1:
        raise ValueError("the datasets disagree on the action dimension: "
                         + ", ".join(f"{p}: {a}" for p, (_, a) in layouts.items()))
    widths = np.array([dims for dims, _ in layouts.values()])  # (datasets, keys)
    padded = [k for k, col in zip(state_keys, widths.T) if len(set(col)) > 1]
    return [int(w) for w in widths.max(0)], padded, action_dims.pop()


def object_layout(paths: list[str]) -> tuple[list[str], list[int]]:
    """(per-object keys, their widths) over every dataset's task (envs/objects.py), in order of first appearance:
    the tokens of a multi-task checkpoint."""
    widths: dict[str, int] = {}
    for path in paths:
        peek(path, [])
        with h5py.File(path, "r") as f:
            for key, width in object_widths(task_of_file(f["data"].attrs.get("env_args", "{}"))).items():
                widths.setdefault(key, width)
    return list(widths), list(widths.values())


# the state keys and widths and the objects are free: their projections start fresh (init_weights)
ARCH_FIELDS = ("cameras", "image_size", "action_dim", "horizon", "n_obs_steps", "text_encoder",
               "max_text_tokens", "vision_channels", "vision_grid", "n_image_steps", "n_emb", "n_head",
               "n_prefix_layers", "n_layer", "objective")


def init_weights(policy: VLAPolicy, directory: str) -> dict:
    """Start from another VLA checkpoint's (EMA) weights: the same architecture, the state widths free (a Lift
    checkpoint starts a Lift + Can one, whose ``object`` is wider). Tensors whose shape differs (the state token's
    projection) keep their fresh init and are listed; the normalizer is this run's data's. Returns the provenance
    kept in the training record."""
    d, rec = init_source(directory, policy.config_dict(), ARCH_FIELDS)
    weights, mine = load_file(str(d / "model.safetensors")), policy.state_dict()
    weights = {k: v for k, v in weights.items() if k in mine}
    source, kept = json.loads((d / "config.json").read_text()), []
    if "state_proj.weight" in weights and weights["state_proj.weight"].shape != mine["state_proj.weight"].shape:
        w, kept = state_columns(weights["state_proj.weight"], source, policy.config, mine["state_proj.weight"])
        if kept:
            weights["state_proj.weight"] = w
    fresh = sorted(k for k, v in mine.items() if k not in weights or weights[k].shape != v.shape)
    policy.load_state_dict({k: v for k, v in weights.items() if k not in fresh}, strict=False)
    out = {"checkpoint": str(d), "steps": rec.get("steps"), "datasets": rec.get("datasets"),
           "command": rec.get("command"), "init_from": rec.get("init_from"), "fresh_tensors": fresh}
    if kept:
        out["state_proj_columns_kept"] = kept  # the rest of state_proj.weight starts fresh
    return out


def state_columns(weight: torch.Tensor, source: dict, config: VLAConfig,
                  init: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """The state projection for ``config``'s state keys from a source checkpoint's (``weight``, its config
    ``source``): the columns of every key both have at the same width copied, the others ``init``'s (a run that
    moves ``object`` out of the state into object tokens keeps what the robot state's columns learnt). A key that
    is zero-padded here and was narrower in the source (``object`` when a task with more objects joins) keeps the
    source's columns as its leading ones: the source's tasks fill exactly those (the padding is at the end), so on
    them the projection starts as it was; the new columns start fresh. Returns it and the keys copied
    (``key[:n]`` for the leading n columns of a widened key)."""
    out, kept = init.clone(), []
    src = dict(zip(source.get("state_keys", []), zip(np.cumsum([0, *source.get("state_dims", [])]), source.get("state_dims", []))))
    src_padded = source.get("padded_state_keys", [])
    for start, key, dim in zip(np.cumsum([0, *config.state_dims]), config.state_keys, config.state_dims):
        if key not in src:
            continue
        s0, n = src[key]
        if n == dim and key not in config.padded_state_keys and key not in src_padded:
            kept.append(key)
        elif n <= dim and key in config.padded_state_keys:  # widened (or as wide): the leading columns
            kept.append(key if n == dim else f"{key}[:{n}]")
        else:
            continue
        out[:, start: start + n] = weight[:, s0: s0 + n]
    return out, kept


def random_shift(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """(B, To, H, W, 3) uint8, each sample shifted by up to ``shift`` pixels (the same shift over its To steps)."""
    if shift <= 0:
        return images
    B, To, H, W, C = images.shape
    x = images.permute(0, 1, 4, 2, 3).reshape(B, To * C, H, W).float()
    x = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    dx = torch.randint(0, 2 * shift + 1, (B,), generator=generator)
    dy = torch.randint(0, 2 * shift + 1, (B,), generator=generator)
    out = torch.stack([x[b, :, dy[b]: dy[b] + H, dx[b]: dx[b] + W] for b in range(B)])
    return out.view(B, To, C, H, W).permute(0, 1, 3, 4, 2).round().to(torch.uint8)


def train(args) -> Path:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()
    state_dims, padded, action_dim = state_layout(args.datasets, args.state_keys)
    object_keys, object_dims = object_layout(args.datasets) if args.object_tokens else ([], [])
    if object_keys and "object" in args.state_keys:
        raise ValueError("--object-tokens gives each object its own token: leave 'object' out of --state-keys")
    config = VLAConfig(objective=args.objective, scheduler="flow" if args.objective == "flow" else "ddim",
                       num_inference_steps=args.num_inference_steps, n_emb=args.n_emb, n_layer=args.n_layer,
                       n_prefix_layers=args.n_prefix_layers, text_encoder=args.text_encoder,
                       image_size=args.image_size, cameras=list(args.cameras), state_keys=list(args.state_keys),
                       state_dims=state_dims, padded_state_keys=padded, action_dim=action_dim,
                       object_keys=object_keys, object_dims=object_dims, image_attention=args.image_attention,
                       vision_channels=list(args.vision_channels),
                       vision_grid=args.vision_grid, n_head=args.n_head)
    data = LanguageDemos(args.datasets, config)
    normalizer = data.normalizer()
    policy = VLAPolicy(config, normalizer).train()
    init_record = init_weights(policy, args.init_from) if args.init_from else None
    ema = EMA(policy)
    ema.model.set_normalizer(normalizer)
    opt = torch.optim.AdamW(optimizer_groups(policy, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(args.seed)
    n_params = sum(p.numel() for p in policy.parameters())
    print(f"{len(data.demos)} demos, {len(data.windows)} windows; {n_params / 1e6:.2f}M parameters "
          f"({config.objective}, text encoder {config.text_encoder})", flush=True)
    out = Path(args.out)
    record = {"command": "python " + shlex.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "datasets": [{"path": p, "sha256": file_sha256(Path(p))} for p in args.datasets],
              "n_demos": len(data.demos), "n_windows": len(data.windows), "n_params": n_params,
              "batch_size": args.batch_size, "sample_by": args.sample_by,
              "file_weights": args.file_weights, "lr": args.lr, "shift": args.shift,
              "threads": args.threads,
              "torch": torch.__version__, "loss_curve": []}
    if padded:
        record["padded_state_keys"] = padded
    if object_keys:
        record["object_keys"] = object_keys
    if init_record:
        record["init_from"] = init_record

    calib_obs = data.calibration_obs()

    def save(step: int) -> None:
        record.update(steps=step, train_wall_s=round(time.time() - t0, 1), total_wall_s=round(time.time() - t_start, 1))
        save_policy(ema.model, out, record)
        calib_obs_path(out).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(calib_obs_path(out), **calib_obs)
        print(f"wrote {out} at step {step}", flush=True)

    step, running, t0, last_save = 0, 0.0, time.time(), time.time()
    total, probe_t0 = args.steps, None  # the cosine schedule's length: from the rate of steps 20-60 and the budget
    while step < total and time.time() - t0 < args.time_budget_s:
        if step == 20:
            probe_t0 = time.time()
        elif step == 60 and probe_t0 is not None:
            total = steps_for_budget(args.time_budget_s, time.time() - t0, 40, time.time() - probe_t0, step, args.steps)
            print(f"--time-budget-s {args.time_budget_s:g}: {40 / (time.time() - probe_t0):.2f} steps/s -> {total} steps",
                  flush=True)
        idx = data.sample(args.batch_size, g, by=args.sample_by, file_weights=args.file_weights)
        b = data.batch(idx)
        n = config.n_image_steps  # the policy looks at the last n frames only: augment just those
        images = {c: random_shift(torch.from_numpy(b[f"{c}_image"][:, -n:]), args.shift, g) for c in config.cameras}
        nstate = normalizer.normalize("state", torch.from_numpy(b["state"]))
        naction = normalizer.normalize("action", torch.from_numpy(b["actions"]))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, args.lr, args.warmup)
        objects = policy.check_objects(data.object_obs(b["objects"], b["present"]), len(idx))
        loss = policy.compute_loss(images, nstate, b["instruction"], naction, generator=g, objects=objects)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        ema.update(policy, step)
        step += 1
        record["final_loss"] = loss.item()  # the last batch's (the curve holds the smoothed values)
        running += record["final_loss"]
        if step % args.log_every == 0:
            record["loss_curve"].append({"step": step, "loss": running / args.log_every,
                                         "wall_s": round(time.time() - t0, 1)})
            running = 0.0
            print(f"step {step} loss {record['loss_curve'][-1]['loss']:.4f} ({time.time() - t0:.0f} s)", flush=True)
        if args.save_every_s and time.time() - last_save > args.save_every_s:
            save(step)
            last_save = time.time()
    save(step)
    return out


def parse_args(argv=None):
    d = VLAConfig()  # the architecture's defaults live in the config
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", required=True)
    p.add_argument("--out", default="checkpoints/vla")
    p.add_argument("--objective", default="flow", choices=["flow", "ddpm"])
    p.add_argument("--num-inference-steps", type=int, default=None, help="default: 10 (flow), 100 (ddpm)")
    p.add_argument("--text-encoder", default=d.text_encoder, choices=TEXT_ENCODERS)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--cameras", nargs="+", default=d.cameras)
    p.add_argument("--state-keys", nargs="+", default=d.state_keys)
    p.add_argument("--object-tokens", action="store_true",
                   help="one prefix token per object, shared by the tasks that have it (envs/objects.py)")
    p.add_argument("--image-attention", default=d.image_attention, choices=["all", "images"],
                   help="what the image tokens attend to in the prefix (images: only images, so token reuse is sound)")
    p.add_argument("--vision-channels", nargs="+", type=int, default=d.vision_channels)
    for flag in ("vision_grid", "n_head", "n_emb", "n_layer", "n_prefix_layers"):
        p.add_argument("--" + flag.replace("_", "-"), type=int, default=getattr(d, flag))
    p.add_argument("--init-from", default=None, help="VLA checkpoint folder whose weights start this run (same architecture)")
    p.add_argument("--steps", type=int, default=100000)
    p.add_argument("--time-budget-s", type=float, default=3600.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sample-by", default="window", choices=["window", "file"],
                   help="window: uniform over all windows; file: each demo file (task) an equal share of the batches")
    p.add_argument("--file-weights", nargs="+", type=float, default=None,
                   help="with --sample-by file: each dataset's share of the batches, in --datasets order (default: equal)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--weight-decay", type=float, default=1e-3)
    p.add_argument("--shift", type=int, default=4, help="random image shift in pixels (0: none)")
    p.add_argument("--save-every-s", type=float, default=600.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args(argv)
    if args.num_inference_steps is None:
        args.num_inference_steps = 10 if args.objective == "flow" else 100
    if args.file_weights is not None:  # checked before the demos load (minutes), not at the first batch
        if args.sample_by != "file":
            p.error("--file-weights needs --sample-by file")
        if len(args.file_weights) != len(args.datasets) or min(args.file_weights) < 0 or sum(args.file_weights) <= 0:
            p.error(f"--file-weights takes one non-negative share per dataset ({len(args.datasets)}), not all zero; "
                    f"got {args.file_weights}")
    return args


def main(argv=None) -> Path:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
