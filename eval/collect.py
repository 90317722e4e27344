"""Collect scripted-expert demos for a robomimic task into a robomimic-layout hdf5 file.

    python eval/collect.py --task lift --n-demos 200 --out data/lift.hdf5 [--seed-offset 1000] [--noise 0.1] [--rot-noise 0.1]
    python eval/collect.py --task nut_assembly --language --cameras agentview,robot0_eye_in_hand --n-demos 100 \
        --out data/lang/nut_assembly.hdf5

``--language``: every episode's goal (which nut, which object) is drawn from its seed and the demo stores the
instruction (a training phrasing; the held-out paraphrases are for evaluation only) and the goal.
``--cameras``: the demos also hold 84 px images of those cameras (uint8); about 50 ms per step for two.

Episode i resets with seed ``seed_offset + i`` and runs the expert until the first success plus ``--hold`` steps
(so the labels include holding the result). Only successful episodes are kept, until ``--n-demos`` are.
DART-style noise (Laskey et al. 2017): the env executes ``clip(expert + N(0, noise^2))`` on the translation dims,
but the clean expert action is recorded as the label, so the demos visit (and label) recovery states.
``--rot-noise`` does the same on the rotation dims, so the demos also show the expert correcting a tilted gripper.
``--drop-prob p``: in a fraction p of the episodes (drawn from the seed) the env executes an open gripper for
``--drop-steps`` steps from the first step the expert holds the object, while the label stays the expert's:
the object falls, the expert finds its fingers shut on air (or the object away) and goes back for it, so the demos
show a missed grasp and the re-grasp (the demo's ``drop_at`` attribute: the step the drop started).
``--workers N``: N processes run the episodes side by side (one core each; two cameras cost ~0.1 s a step on one
core, so a few hundred demos with images take an hour on one); the demos are written in seed order and are the
same as one process's, because an episode is a function of its seed alone.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import contextlib
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from tqdm import tqdm

from envs import make_env
from envs.objects import PREFIX as OBJECT_PREFIX
from envs.recorder import DemoWriter

# toy: the numpy task of envs/toy.py
TASKS = ("lift", "can", "square", "nut_assembly", "pick_place", "two_cubes", "toy")


def make_env_and_expert(task: str, horizon: int, seed: int, cameras: tuple[str, ...] = (), image_size: int = 84,
                        language: bool = False):
    if task == "toy":
        from envs.toy import ToyExpert

        env = make_env("toy", horizon=horizon, cameras=cameras, image_size=image_size, language=language)
        return env, ToyExpert(np.random.default_rng(seed))
    from envs.experts import make_expert

    env = make_env("robomimic", task=task, horizon=horizon, cameras=cameras, image_size=image_size,
                   language=language)
    return env, make_expert(task, env)


def rollout(env, expert, seed: int, noise: float, hold: int, rot_noise: float = 0.0, drop_prob: float = 0.0,
            drop_steps: int = 8) -> tuple[bool, dict]:
    """One expert episode; returns (success, arguments for DemoWriter.add)."""
    obs, reset_info = env.reset(seed=seed)
    if hasattr(expert, "reseed"):  # an expert that draws (the toy's side of the wall) draws from the seed too
        expert.reseed(seed)
    expert.reset()
    noise_rng = np.random.default_rng([seed, 7])  # the demo is reproducible from its seed alone
    # its own generator, so that --drop-prob 0 leaves the noise (and the demos) as they were
    drop = drop_prob > 0 and np.random.default_rng([seed, 11]).random() < drop_prob
    holding = getattr(expert, "holding_phases", None)
    if drop and holding is None:
        raise ValueError(f"--drop-prob needs an expert with a grasp ({type(expert).__name__} has none)")
    drop_at = None
    # the per-object keys are ``object`` split (envs/objects.py): readers split it again, as robomimic files hold it
    keys = {k: [] for k in env.observation_space.spaces if k != "instruction" and not k.startswith(OBJECT_PREFIX)}
    n_noisy = min(3, env.action_space.shape[0])  # translation dims
    actions, rewards = [], []
    success_at = None
    for t in range(env.max_episode_steps):
        action = expert.act(obs)  # (Da,)
        executed = action.copy()
        if noise > 0:
            executed[:n_noisy] = np.clip(executed[:n_noisy] + noise_rng.normal(0.0, noise, n_noisy), -1.0, 1.0)
        if rot_noise > 0 and len(executed) >= 6:  # drawn after the translation noise: --rot-noise 0 keeps old demos
            executed[3:6] = np.clip(executed[3:6] + noise_rng.normal(0.0, rot_noise, 3), -1.0, 1.0)
        if drop and drop_at is None and expert.phase in holding:
            drop_at = t
        if drop_at is not None and t < drop_at + drop_steps:
            executed[-1] = -1.0  # the gripper opens under the expert's "close"
        for k in keys:
            keys[k].append(obs[k])
        actions.append(action)
        obs, reward, terminated, truncated, info = env.step(executed)
        rewards.append(reward)
        if terminated and success_at is None:
            success_at = t
        if success_at is not None and t >= success_at + hold:
            break
        if truncated:
            break
    arrays = dict(
        obs={k: np.stack(v) for k, v in keys.items()},  # (L, d)
        actions=np.stack(actions),  # (L, Da)
        rewards=np.asarray(rewards, dtype=np.float32),  # (L,)
    )
    if "instruction" in obs:  # language tasks: one instruction per episode
        arrays.update(instruction=obs["instruction"], goal=reset_info["goal"])
    if drop_at is not None:
        arrays["attrs"] = {"drop_at": int(drop_at)}
    return success_at is not None, arrays


_WORKER: dict = {}  # a --workers process's env and expert, made once


def _worker_init(make_args: tuple) -> None:
    _WORKER["env"], _WORKER["expert"] = make_env_and_expert(*make_args)


def _worker_rollout(job: tuple) -> tuple[bool, dict]:
    seed, rollout_args = job
    return rollout(_WORKER["env"], _WORKER["expert"], seed, *rollout_args)


def episodes(env, expert, seeds, rollout_args: tuple, workers: int, make_args: tuple):
    """(seed, success, arrays) of each episode in seed order: in this process with ``env``/``expert``, or over
    ``workers`` spawned processes (each builds its own env from ``make_args`` and takes the next seed when it is
    free; episodes that finish after a slower earlier one wait in memory, so results come back in seed order).
    Close the generator to stop them: the pool is terminated, episodes under way are dropped."""
    if workers <= 1:
        for seed in seeds:
            yield (seed, *rollout(env, expert, seed, *rollout_args))
        return
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no forked renderer or simulator
    with ctx.Pool(workers, initializer=_worker_init, initargs=(make_args,)) as pool:
        for seed, result in zip(seeds, pool.imap(_worker_rollout, ((s, rollout_args) for s in seeds))):
            yield (seed, *result)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--n-demos", type=int, required=True, help="successful demos to keep")
    p.add_argument("--out", required=True, help="output .hdf5 path")
    p.add_argument("--seed-offset", type=int, default=1000, help="episode i resets with seed seed_offset + i")
    p.add_argument("--noise", type=float, default=0.1, help="DART noise std on the executed translation actions")
    p.add_argument("--rot-noise", type=float, default=0.0, help="DART noise std on the executed rotation actions")
    p.add_argument("--drop-prob", type=float, default=0.0,
                   help="fraction of episodes whose gripper is forced open once the expert holds the object")
    p.add_argument("--drop-steps", type=int, default=8, help="steps the forced drop lasts")
    p.add_argument("--hold", type=int, default=5, help="steps recorded after the first success")
    p.add_argument("--horizon", type=int, default=None, help="episode step limit (default: 400, toy 60)")
    p.add_argument("--max-attempts", type=int, default=None, help="give up after this many episodes (default 2x)")
    p.add_argument("--cameras", default="", help="comma-separated cameras to record (agentview, robot0_eye_in_hand)")
    p.add_argument("--image-size", type=int, default=84)
    p.add_argument("--language", action="store_true", help="draw a goal per episode and store its instruction")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--workers", type=int, default=1, help="processes running episodes side by side (same demos)")
    args = p.parse_args(argv)
    if args.n_demos <= 0:
        p.error(f"--n-demos must be positive, got {args.n_demos}")
    if args.noise < 0 or args.rot_noise < 0:
        p.error(f"--noise and --rot-noise must be >= 0, got {args.noise} and {args.rot_noise}")
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if not 0 <= args.drop_prob <= 1 or args.drop_steps < 1:
        p.error(f"--drop-prob must be in [0, 1] and --drop-steps >= 1, got {args.drop_prob} and {args.drop_steps}")
    max_attempts = args.max_attempts or 2 * args.n_demos
    if Path(args.out).exists() and not args.overwrite:
        p.error(f"{args.out} exists; pass --overwrite to replace it")

    t0 = time.time()
    horizon = args.horizon or (60 if args.task == "toy" else 400)
    cameras = tuple(c for c in args.cameras.split(",") if c)
    make_args = (args.task, horizon, args.seed_offset, cameras, args.image_size, args.language)
    env, expert = make_env_and_expert(*make_args)
    rollout_args = (args.noise, args.hold, args.rot_noise, args.drop_prob, args.drop_steps)
    seeds = range(args.seed_offset, args.seed_offset + max_attempts)
    kept = attempted = steps = dropped = 0
    with DemoWriter(args.out, env.env_meta(), overwrite=args.overwrite) as writer, \
            contextlib.closing(episodes(env, expert, seeds, rollout_args, args.workers, make_args)) as stream:
        bar = tqdm(total=args.n_demos, desc=f"{args.task} demos", unit="demo")
        for seed, ok, arrays in stream:
            attempted += 1
            if ok:
                writer.add(**arrays, seed=seed)
                kept += 1
                dropped += "attrs" in arrays
                steps += len(arrays["actions"])
                bar.update(1)
            bar.set_postfix(success=f"{kept / attempted:.3f}", attempts=attempted)
            if kept == args.n_demos:
                break
        bar.close()
    env.close()
    wall = time.time() - t0
    print(
        f"task={args.task} noise={args.noise} rot_noise={args.rot_noise}: expert success rate {kept}/{attempted} = {kept / attempted:.3f}; "
        f"kept {kept} demos, {steps} samples (mean length {steps / max(kept, 1):.1f}) -> {args.out}; "
        f"wall time {wall:.0f} s ({wall / 60:.1f} min)" + (f"; {dropped} kept demos re-grasp after a forced drop" if args.drop_prob else "")
    )
    if kept < args.n_demos:
        print(f"WARNING: only {kept} of {args.n_demos} demos after {attempted} attempts (--max-attempts)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
