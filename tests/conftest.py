import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Budget choices recorded by the tests go to a folder of this session, not the user's ~/.cache/bac/tune.
os.environ["BAC_TUNE_RECORDS"] = __import__("tempfile").mkdtemp(prefix="bac_tune_records_")

import torch  # noqa: E402

torch.set_num_threads(1)


from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def toy_checkpoint(tmp_path_factory) -> Path:
    """A tiny DP-T trained on the toy task's expert demos (about half a minute); its demos sit next to it."""
    import eval.collect as collect
    import eval.train as train

    d = tmp_path_factory.mktemp("toy")
    assert collect.main(["--task", "toy", "--n-demos", "100", "--out", str(d / "toy.hdf5")]) == 0
    args = train.parse_args([
        "--dataset", str(d / "toy.hdf5"), "--out", str(d / "ckpt"), "--steps", "2000", "--n-layer", "2",
        "--n-emb", "64", "--warmup", "100", "--lr", "1e-3", "--p-drop-attn", "0", "--quiet",
    ])
    train.train(args)
    return d / "ckpt"


def compose_cfg(*overrides: str, config_name: str = "config"):
    """The project's hydra config ``config_name`` composed with ``overrides`` (as the entry points see it)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name, overrides=list(overrides))
