"""Write a shipped checkpoint's manifest: how it was made and how well it does.

    python eval/manifest.py --checkpoint checkpoints/lift --summary results/.../summary.json \
        --collect "python eval/collect.py --task lift --n-demos 200 --out data/lift.hdf5"

manifest.json = the demo command, the dataset sha256 and size, every training command (resumes
included), steps and wall time from train_record.json, and the measured evaluation (success with its
interval, episodes, seeds, actions executed per chunk, latency, device, the command that measured it). A multi-task
checkpoint takes a ``--summary`` per task and one ``--collect`` per demo file; its manifest lists ``tasks`` and
``evaluations`` by task. Several summaries of one task (the same cell on disjoint seed sets) are pooled: the
successes over all their episodes with the interval, each run kept.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--summary", required=True, nargs="+",
                   help="summary.json of an eval/run.py run of this checkpoint (one per task of a multi-task one; "
                        "several of one task, the same cell on disjoint seeds, are pooled)")
    p.add_argument("--collect", required=True, nargs="+", help="the command(s) that made the demos")
    p.add_argument("--eval-command", default=None, nargs="+",
                   help="the eval/run.py command of each summary (default: from the summary)")
    p.add_argument("--init-collect", default=None,
                   help="for a run started with train.py --init-from: how the source checkpoint's demos were made")
    p.add_argument("--note", default=None, help="free text kept in the manifest (e.g. what does not work yet)")
    a = p.parse_args(argv)
    ckpt = Path(a.checkpoint)
    record = json.loads((ckpt / "train_record.json").read_text())
    summaries = [json.loads(Path(path).read_text()) for path in a.summary]
    if a.eval_command and len(a.eval_command) != len(summaries):
        raise ValueError(f"{len(a.eval_command)} --eval-command for {len(summaries)} --summary")
    tasks = list(dict.fromkeys(s["task"] for s in summaries))
    collect = a.collect[0] if len(a.collect) == 1 else a.collect
    if "datasets" in record:  # eval/train_vla.py: one or more demo files
        demos = {"command": collect, "datasets": record["datasets"]}
    else:
        demos = {"command": collect, "dataset": record["dataset"], "sha256": record["dataset_sha256"]}
    final_loss = record["final_loss"] if "final_loss" in record else record["loss_curve"][-1]["loss"]  # (older VLA records)
    commands = a.eval_command or [None] * len(summaries)
    evaluations = {task: pooled([(s, cmd) for s, cmd in zip(summaries, commands) if s["task"] == task])
                   for task in tasks}
    manifest = {
        **({"task": tasks[0]} if len(tasks) == 1 else {"tasks": tasks}),
        "demos": {**demos, "n_demos": record["n_demos"], "n_windows": record["n_windows"]},
        "training": {"commands": record.get("commands", [record["command"]]), "steps": record["steps"],
                     "batch_size": record["batch_size"], "final_loss": final_loss,
                     "wall_time_s": record.get("wall_time_s", record.get("train_wall_s")), "torch": record["torch"]},
        **({"evaluation": evaluations[tasks[0]]} if len(tasks) == 1 else {"evaluations": evaluations}),
    }
    if record.get("init_from"):
        manifest["training"]["init_from"] = dict(record["init_from"], demos_command=a.init_collect)
    if a.note:
        manifest["status"] = a.note
    old = ckpt / "manifest.json"
    if old.exists() and "weights" in json.loads(old.read_text()):
        manifest["weights"] = json.loads(old.read_text())["weights"]  # written by save_policy, checked on load
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for task, e in evaluations.items():
        print(f"wrote {ckpt / 'manifest.json'}: {task} success {e['success_rate']:.2f} {e['success_ci95']}")


# what makes two runs the same cell (their episodes may be pooled)
CELL_KEYS = ("env", "task", "cache", "scheduler", "num_inference_steps", "n_action_steps")


def pooled(runs: list[tuple[dict, str | None]]) -> dict:
    """The evaluation of one task: one run's cell, or several runs of the same cell on disjoint seeds pooled
    (successes over all their episodes with the Wilson interval; each run kept under ``runs``)."""
    from bac.metrics import wilson_interval

    if len(runs) == 1:
        return evaluation(*runs[0])
    first = runs[0][0]
    for s, _ in runs[1:]:
        differ = [k for k in CELL_KEYS if s.get(k) != first.get(k)]
        if differ:
            raise ValueError(f"summaries of task {first['task']!r} pool only when they are the same cell; they differ "
                             f"in {differ}: " + ", ".join(f"{k}={first.get(k)!r} vs {s.get(k)!r}" for k in differ))
    spans = sorted((s["seeds"][0], s["seeds"][-1]) for s, _ in runs)
    if any(lo <= prev_hi for (_, prev_hi), (lo, _) in zip(spans, spans[1:])):
        raise ValueError(f"summaries of task {first['task']!r} pool only on disjoint seeds; their seed ranges are {spans}")
    n = sum(s["n_episodes"] for s, _ in runs)
    k = sum(s.get("n_successes", round(s["success_rate"] * s["n_episodes"])) for s, _ in runs)
    return {**{key: first[key] for key in ("cache", "scheduler", "num_inference_steps")},
            "n_action_steps": first.get("n_action_steps"), "n_episodes": n, "n_successes": k,
            "success_rate": round(k / n, 4), "success_ci95": [round(b, 4) for b in wilson_interval(k, n)],
            "runs": [evaluation(s, cmd) for s, cmd in runs]}


def evaluation(s: dict, command: str | None) -> dict:
    """The measured cell of one eval/run.py summary."""
    language = {"language": s["language"]} if s.get("language") else {}
    return {"command": command or f"python eval/run.py env={s['env']} env.task={s['task']} eval.n_episodes="
                                  f"{s['n_episodes']} eval.seed={s['seeds'][0]}",
            "cache": s["cache"], "scheduler": s["scheduler"], "num_inference_steps": s["num_inference_steps"],
            "n_action_steps": s.get("n_action_steps"), "n_episodes": s["n_episodes"], "seeds": s["seeds"],
            "success_rate": s["success_rate"], "success_ci95": s["success_ci95"], "latency_ms": s["latency_ms"],
            "inference_hz": s["inference_hz"], "control_hz": s["control_hz"], "device": s["device"], **language}


if __name__ == "__main__":
    main()
