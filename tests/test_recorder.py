"""Round trip of the robomimic-layout demo files, and the writer's refusal to clobber files."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from envs.recorder import DemoWriter, read_demos

META = {"env_name": "Lift", "type": 1, "env_kwargs": {"robots": "Panda", "control_freq": 20, "horizon": 400}}
DIMS = {"object": 10, "robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2}


def _demo(rng: np.random.Generator, L: int) -> dict:
    return dict(
        obs={k: rng.normal(size=(L, d)).astype(np.float32) for k, d in DIMS.items()},  # (L, d)
        actions=rng.uniform(-1, 1, size=(L, 7)).astype(np.float32),  # (L, Da)
        rewards=(np.arange(L) == L - 1).astype(np.float32),  # (L,)
    )


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    demos = [_demo(rng, L) for L in (5, 12, 3)]
    path = tmp_path / "d.hdf5"
    with DemoWriter(path, META) as w:
        for i, d in enumerate(demos):
            assert w.add(**d, seed=100 + i) == f"demo_{i}"
    meta, back = read_demos(path)
    assert meta == META
    assert [b["name"] for b in back] == ["demo_0", "demo_1", "demo_2"]
    for i, (d, b) in enumerate(zip(demos, back)):
        assert b["seed"] == 100 + i
        np.testing.assert_array_equal(b["actions"], d["actions"])
        np.testing.assert_array_equal(b["rewards"], d["rewards"])
        assert b["dones"].tolist() == [0] * (len(d["actions"]) - 1) + [1]
        assert set(b["obs"]) == set(DIMS)
        for k in DIMS:
            assert b["obs"][k].dtype == np.float32
            np.testing.assert_array_equal(b["obs"][k], d["obs"][k])


def test_layout_is_robomimic(tmp_path):
    """The raw hdf5 layout, as robomimic's SequenceDataset reads it."""
    path = tmp_path / "d.hdf5"
    with DemoWriter(path, META) as w:
        w.add(**_demo(np.random.default_rng(1), 7), seed=3)
        w.add(**_demo(np.random.default_rng(2), 4), seed=4)
    with h5py.File(path, "r") as f:
        assert json.loads(f["data"].attrs["env_args"]) == META
        assert f["data"].attrs["total"] == 11
        g = f["data/demo_1"]
        assert g.attrs["num_samples"] == 4 and g.attrs["seed"] == 4
        assert g["actions"].shape == (4, 7) and g["actions"].dtype == np.float32
        assert g["obs/object"].shape == (4, 10) and g["obs/robot0_eef_quat"].shape == (4, 4)
        assert g["rewards"].shape == (4,) and g["dones"][-1] == 1
        assert g["actions"].compression == "gzip"


def test_demo_order_is_numeric(tmp_path):
    path = tmp_path / "d.hdf5"
    with DemoWriter(path, META) as w:
        for i in range(12):
            w.add(**_demo(np.random.default_rng(i), 2), seed=i)
    _, back = read_demos(path)
    assert [b["seed"] for b in back] == list(range(12))


def test_refuses_to_overwrite(tmp_path):
    path = tmp_path / "d.hdf5"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        DemoWriter(path, META)
    assert path.read_bytes() == b"precious"


def test_overwrite_replaces_only_at_close(tmp_path):
    path = tmp_path / "d.hdf5"
    path.write_bytes(b"old")
    w = DemoWriter(path, META, overwrite=True)
    w.add(**_demo(np.random.default_rng(0), 3), seed=0)
    assert path.read_bytes() == b"old"  # still the old file while writing
    w.close()
    _, back = read_demos(path)
    assert len(back) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["d.hdf5"]  # no temp file left behind


def test_crash_keeps_old_file(tmp_path):
    path = tmp_path / "d.hdf5"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with DemoWriter(path, META, overwrite=True) as w:
            w.add(**_demo(np.random.default_rng(0), 3), seed=0)
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old"


def test_rejects_mismatched_lengths(tmp_path):
    d = _demo(np.random.default_rng(0), 5)
    d["obs"]["object"] = d["obs"]["object"][:4]
    with DemoWriter(tmp_path / "d.hdf5", META) as w:
        with pytest.raises(ValueError, match="obs/object has 4 steps but actions has 5"):
            w.add(**d)


def test_images_and_instruction_round_trip(tmp_path):
    """Camera images stay (L, H, W, 3) uint8 and the instruction and goal come back as strings; anything else
    named like an image is refused."""
    rng = np.random.default_rng(1)
    d = _demo(rng, 4)
    d["obs"]["agentview_image"] = rng.integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "img.hdf5"
    with DemoWriter(path, META) as w:
        w.add(**d, seed=3, instruction="put the round nut on its peg", goal="round")
        w.add(**_demo(rng, 2))
    _, (a, b) = read_demos(path)
    np.testing.assert_array_equal(a["obs"]["agentview_image"], d["obs"]["agentview_image"])
    assert a["obs"]["agentview_image"].dtype == np.uint8
    assert (a["instruction"], a["goal"]) == ("put the round nut on its peg", "round")
    assert (b["instruction"], b["goal"]) == (None, None)
    bad = _demo(rng, 4)
    bad["obs"]["wrist_image"] = rng.normal(size=(4, 8, 8, 3))
    with DemoWriter(tmp_path / "bad.hdf5", META) as w, pytest.raises(ValueError, match="uint8 images"):
        w.add(**bad)


def test_collect_with_workers_writes_the_same_demos_in_seed_order(tmp_path):
    """eval/collect.py --workers: episodes run in spawned processes, and the file equals one process's (an
    episode is a function of its seed), with the failed seeds skipped in the same places."""
    import eval.collect as collect

    args = ["--task", "toy", "--language", "--cameras", "agentview", "--image-size", "16", "--n-demos", "5",
            "--noise", "0.3", "--horizon", "22"]  # a short horizon: some episodes fail
    assert collect.main([*args, "--out", str(tmp_path / "one.hdf5")]) == 0
    assert collect.main([*args, "--out", str(tmp_path / "two.hdf5"), "--workers", "2"]) == 0
    (meta, one), (meta2, two) = read_demos(tmp_path / "one.hdf5"), read_demos(tmp_path / "two.hdf5")
    seeds = [d["seed"] for d in one]
    assert meta == meta2 and seeds == [d["seed"] for d in two] and len(one) == 5
    assert seeds[-1] - seeds[0] > 4  # failed seeds were skipped, in the same places
    for a, b in zip(one, two):
        assert a["instruction"] == b["instruction"] and np.array_equal(a["actions"], b["actions"])
        assert all(np.array_equal(a["obs"][k], b["obs"][k]) for k in a["obs"])
    with pytest.raises(SystemExit):
        collect.main([*args, "--out", str(tmp_path / "x.hdf5"), "--workers", "0"])
