"""Train a class-conditional DiT backend (and the digit classifier that judges its samples) on scikit-learn's
bundled digits: the image DiT on the digits upsampled, the video DiT on clips of them moving (fresh motion every
batch); writes a checkpoint folder (a few MB).

    python eval/train_dit.py --out checkpoints/dit_image --time-budget-s 1200
    python eval/train_dit.py --backend dit_video --out checkpoints/dit_video --time-budget-s 2400

Writes model.safetensors (EMA weights), config.json, classifier.safetensors + classifier.json, train_record.json
(loss curve, classifier test accuracy, steps, wall time, the command) and manifest.json (sha256 of each file).
Training stops at ``--steps`` or when ``--time-budget-s`` is spent, whichever comes first.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from backends import BACKENDS, backend  # noqa: E402
from backends.digit_classifier import accuracy, save_classifier, train_classifier  # noqa: E402
from backends.generator import save_generator  # noqa: E402

# the architecture flags (None: the backend config's default) and the config field each sets
ARCH = {"image_size": "image_size", "frames": "frames", "canvas": "canvas", "digit": "digit",
        "num_layers": "num_layers", "num_heads": "num_heads", "head_dim": "head_dim", "patch_size": "patch_size"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="dit_image", choices=BACKENDS)
    p.add_argument("--out", default=None, help="default: checkpoints/<backend>")
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--time-budget-s", type=float, default=1200.0, help="stop training the DiT after this many seconds")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ema", type=float, default=0.999)
    for flag in ARCH:
        p.add_argument("--" + flag.replace("_", "-"), type=int, default=None, help="default: the backend config's")
    p.add_argument("--init", default=None, help="a checkpoint folder of the same backend and architecture to start "
                   "from (its weights and its classifier; training continues from them)")
    p.add_argument("--classifier-epochs", type=int, default=None, help="default: 30 (image), 8 (video: 8x the images)")
    p.add_argument("--save-every-s", type=float, default=None, help="also write the checkpoint folder (EMA weights, "
                   "record so far) every this many seconds of training, so a long run can be looked at or stopped")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    return p.parse_args(argv)


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()
    cls, _ = backend(args.backend)
    arch = {field: getattr(args, flag) for flag, field in ARCH.items() if getattr(args, flag) is not None}
    unknown = sorted(set(arch) - set(cls.Config.__dataclass_fields__))
    if unknown:
        raise SystemExit(f"{args.backend} has no {unknown}; its config: {sorted(cls.Config.__dataclass_fields__)}")
    gen = cls(cls.Config(**arch))
    config = gen.config
    (x, y), _ = gen.digits_split()
    (_, _), (real_test, y_test) = gen.real_split()

    # the classifier judges what the backend's samples look like: images, or the frames of clips
    g_clf = torch.Generator().manual_seed(args.seed)
    epochs = args.classifier_epochs or (30 if gen.sample_shape[1:] == x.shape[1:] else 8)
    if args.init:  # continue: the weights and the classifier of a checkpoint of this backend and architecture
        from backends.digit_classifier import load_classifier

        init = backend(args.backend)[1](args.init)
        if init.config != config:
            raise SystemExit(f"--init {args.init} holds {init.config}, not the architecture asked for: {config}")
        gen.model.load_state_dict(init.model.state_dict())
        clf, epochs = load_classifier(args.init), 0
    else:
        clf_x, clf_y = gen.as_images(gen.training_batch(x, g_clf)), gen.image_labels(y)
        clf = train_classifier(clf_x, clf_y, epochs=epochs, seed=args.seed)
    clf_acc = accuracy(clf, gen.as_images(real_test), gen.image_labels(y_test))
    print(f"classifier: test accuracy {clf_acc:.4f} ({len(y_test)} test samples)", flush=True)

    # train mode: the label embedding drops 10% of labels to the null class (classifier-free guidance)
    model = gen.model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = gen.scheduler
    g = torch.Generator().manual_seed(args.seed)
    curve, running, step, t0 = [], 0.0, 0, time.time()
    last_save = t0

    def record_of(step, curve):
        return _record(args, t_start, t0, len(y), len(y_test), clf_acc, epochs, step, curve)

    def save(ema, step, curve):
        _save(args, gen, clf, ema, record_of(step, curve))

    while step < args.steps and time.time() - t0 < args.time_budget_s:
        idx = torch.randint(0, len(y), (args.batch_size,), generator=g)
        x0, labels = gen.training_batch(x[idx], g), y[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, config.num_train_timesteps, (len(idx),), generator=g)
        pred = model(sched.add_noise(x0, noise, t), timestep=t, class_labels=labels, return_dict=False)[0]
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))  # warm-up of the EMA decay
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        step += 1
        running += loss.item()
        if step % args.log_every == 0:
            curve.append({"step": step, "loss": running / args.log_every, "wall_s": round(time.time() - t0, 1)})
            running = 0.0
            print(f"step {step} loss {curve[-1]['loss']:.4f} ({curve[-1]['wall_s']:.0f} s)", flush=True)
        if args.save_every_s and time.time() - last_save > args.save_every_s:
            save(ema, step, curve)
            last_save = time.time()
    save(ema, step, curve)
    return record_of(step, curve)


def _save(args, gen, clf, ema, record: dict) -> None:
    out = Path(args.out or f"checkpoints/{args.backend}")
    model, gen.model = gen.model, ema
    try:
        extra = save_classifier(clf, out)
        save_generator(gen, out, record, extra_files=tuple(extra))
    finally:
        gen.model = model
    print(f"wrote {out} ({record['steps']} steps, {record['train_wall_s']} s)", flush=True)


def _record(args, t_start, t0, n_train, n_test, clf_acc, epochs, step, curve) -> dict:
    return {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if sys.argv else "",
        "backend": args.backend,
        "data": "sklearn.datasets.load_digits, bilinear upsampled, fixed 80/20 split (seed 0)"
                + ("; clips of moving digits, fresh motion each batch" if args.backend == "dit_video" else ""),
        "n_train": n_train, "n_test": n_test, "steps": step, "batch_size": args.batch_size, "lr": args.lr,
        "ema": args.ema, "threads": args.threads, "train_wall_s": round(time.time() - t0, 1),
        "total_wall_s": round(time.time() - t_start, 1), "final_loss": curve[-1]["loss"] if curve else None,
        "loss_curve": curve, "classifier_test_accuracy": clf_acc, "classifier_epochs": epochs, "init": args.init, "torch": torch.__version__,
    }


def main(argv=None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
