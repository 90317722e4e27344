"""Write a shipped checkpoint's manifest: how it was made and how well it does.

    python eval/manifest.py --checkpoint checkpoints/lift --summary results/.../summary.json \
        --collect "python eval/collect.py --task lift --n-demos 200 --out data/lift.hdf5"

manifest.json = the demo command, the dataset sha256 and size, every training command (resumes
included), steps and wall time from train_record.json, and the measured evaluation (success with its
interval, episodes, seeds, latency, device, the command that measured it).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--summary", required=True, help="summary.json of an eval/run.py run of this checkpoint")
    p.add_argument("--collect", required=True, help="the command that made the demos")
    p.add_argument("--eval-command", default=None, help="the eval/run.py command (default: from the summary)")
    p.add_argument("--init-collect", default=None,
                   help="for a run started with train.py --init-from: how the source checkpoint's demos were made")
    p.add_argument("--note", default=None, help="free text kept in the manifest (e.g. what does not work yet)")
    a = p.parse_args(argv)
    ckpt = Path(a.checkpoint)
    record = json.loads((ckpt / "train_record.json").read_text())
    s = json.loads(Path(a.summary).read_text())
    if "datasets" in record:  # eval/train_vla.py: one or more demo files
        demos = {"command": a.collect, "datasets": record["datasets"]}
    else:
        demos = {"command": a.collect, "dataset": record["dataset"], "sha256": record["dataset_sha256"]}
    final_loss = record["final_loss"] if "final_loss" in record else record["loss_curve"][-1]["loss"]  # (older VLA records)
    manifest = {
        "task": s["task"],
        "demos": {**demos, "n_demos": record["n_demos"], "n_windows": record["n_windows"]},
        "training": {"commands": record.get("commands", [record["command"]]), "steps": record["steps"],
                     "batch_size": record["batch_size"], "final_loss": final_loss,
                     "wall_time_s": record.get("wall_time_s", record.get("train_wall_s")), "torch": record["torch"]},
        "evaluation": {
            "command": a.eval_command or f"python eval/run.py env={s['env']} env.task={s['task']} "
                                        f"eval.n_episodes={s['n_episodes']} eval.seed={s['seeds'][0]}",
            "cache": s["cache"], "scheduler": s["scheduler"], "num_inference_steps": s["num_inference_steps"],
            "n_episodes": s["n_episodes"], "seeds": s["seeds"], "success_rate": s["success_rate"],
            "success_ci95": s["success_ci95"], "latency_ms": s["latency_ms"], "inference_hz": s["inference_hz"],
            "control_hz": s["control_hz"], "device": s["device"],
            **({"language": s["language"]} if s.get("language") else {}),
        },
    }
    if record.get("init_from"):
        manifest["training"]["init_from"] = dict(record["init_from"], demos_command=a.init_collect)
    if a.note:
        manifest["status"] = a.note
    old = ckpt / "manifest.json"
    if old.exists() and "weights" in json.loads(old.read_text()):
        manifest["weights"] = json.loads(old.read_text())["weights"]  # written by save_policy, checked on load
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {ckpt / 'manifest.json'}: {s['task']} success {s['success_rate']:.2f} {s['success_ci95']}")


if __name__ == "__main__":
    main()
