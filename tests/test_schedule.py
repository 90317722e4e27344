"""Schedule artifact: round trip, loud mismatches, masks, and every ablation row from calibration features."""
import json
from dataclasses import asdict

import numpy as np
import pytest

import bac
from bac.blocks import BlockInfo
from bac.schedule import METHODS, Schedule, ScheduleMismatch, compute_all, from_calibration, uniform

BLOCKS = [BlockInfo(f"l{layer}.{kind}", layer, kind) for layer in range(2) for kind in ("attn", "cross_attn", "ffn")]
NAMES = [b.name for b in BLOCKS]
META = dict(scheduler="DDPMScheduler", model_hash="abc123", calibration={"source": "demo_0", "seed": 11})


def features(K=40, N=2, D=16, seed=0):
    """Per block (K, N, D): features that move fast over the first quarter of the steps and slowly after."""
    rng = np.random.default_rng(seed)
    pace = np.concatenate([np.full(K // 4, 1.0), np.full(K - K // 4, 0.02)])
    out = {}
    for i, name in enumerate(NAMES):
        walk = np.cumsum(pace[:, None, None] * rng.normal(size=(K, N, D)), axis=0)  # (K, N, D)
        out[name] = (len(NAMES) - i) * (5.0 + walk)  # shallower blocks drift more: BUA picks them
    return out


def test_save_load_round_trip(tmp_path):
    s = from_calibration(features(), BLOCKS, "bac", n_updates=5, n_bubble=2, **META)
    s.save(tmp_path / "s.json")
    back = Schedule.load(tmp_path / "s.json")
    assert back == s
    assert back.version == bac.__version__ and back.calibration["seed"] == 11
    assert len(back.calibration["bubble_blocks"]) == 2
    text = (tmp_path / "s.json").read_text()
    assert '"l0.attn": [0, ' in text  # step lists stay on one line


def test_load_names_the_missing_field(tmp_path):
    data = asdict(compute_all(NAMES, 5, **META))
    del data["scheduler"]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="scheduler"):
        Schedule.load(tmp_path / "bad.json")


def test_every_mismatch_is_named():
    s = compute_all(NAMES, 100, **META)
    s.check_compatible(blocks=BLOCKS, num_steps=100, scheduler="DDPMScheduler", model_hash="abc123")
    with pytest.raises(ScheduleMismatch, match=r"num_steps=100.*num_steps=10"):
        s.check_compatible(num_steps=10)
    with pytest.raises(ScheduleMismatch, match=r"scheduler='DDPMScheduler'.*DDIMScheduler"):
        s.check_compatible(scheduler="DDIMScheduler")
    with pytest.raises(ScheduleMismatch, match=r"model_hash='abc123'.*ffff"):
        s.check_compatible(model_hash="ffff")
    with pytest.raises(ScheduleMismatch, match=r"lacks \['l2.attn'\].*extra \['l1.ffn'\]"):
        s.check_compatible(blocks=NAMES[:-1] + ["l2.attn"])
    s.check_compatible(blocks=NAMES[::-1])  # a block is its name: order is free
    assert issubclass(ScheduleMismatch, ValueError)


def test_mask_shape_and_content():
    s = Schedule(["a", "b"], {"a": [3, 0], "b": [0, 1, 4]}, num_steps=5, method="blockwise_acs")
    assert s.steps["a"] == [0, 3]  # sorted
    mask = s.to_mask()
    assert mask.dtype == bool and mask.shape == (2, 5)
    np.testing.assert_array_equal(mask, [[1, 0, 0, 1, 0], [1, 1, 0, 0, 1]])
    assert s.computed_fraction() == pytest.approx(5 / 10)


def test_invalid_schedules_are_loud():
    with pytest.raises(ValueError, match="outside"):
        Schedule(["a"], {"a": [0, 5]}, 5, "bac")
    with pytest.raises(ValueError, match="step 0"):
        Schedule(["a"], {"a": [1]}, 5, "bac")
    with pytest.raises(ValueError, match="missing"):
        Schedule(["a", "b"], {"a": [0]}, 5, "bac")
    with pytest.raises(ValueError, match="uniform"):
        Schedule(["a"], {"a": [0]}, 5, "teacache")
    s = Schedule(["a"], {"a": [0]}, 5, "bac")
    s.steps["a"].append(7)  # mutated after construction: to_mask still checks
    with pytest.raises(ValueError, match="outside"):
        s.to_mask()


def test_compute_all_and_uniform():
    assert compute_all(BLOCKS, 10).to_mask().all()
    assert compute_all(BLOCKS, 10).computed_fraction() == 1.0
    u = uniform(NAMES, 100, 10, **META)
    assert all(steps == list(range(0, 100, 10)) for steps in u.steps.values())
    assert uniform(NAMES, 100, 8).steps["l0.attn"] == list(range(0, 100, 12))  # floor(K/S): 9 updates
    assert uniform(NAMES, 5, 50).steps["l0.attn"] == [0, 1, 2, 3, 4]


def test_every_method_from_calibration():
    f = features()
    K = 40
    rows = {m: from_calibration(f, BLOCKS, m, n_updates=6, n_bubble=2, **META) for m in METHODS}
    for m, s in rows.items():
        assert s.method == m and s.num_steps == K and s.blocks == NAMES
        assert s.to_mask().shape == (len(BLOCKS), K)
    assert rows["none"].to_mask().all()
    assert rows["uniform"].steps["l0.ffn"] == list(range(0, 40, 6))

    unified = rows["unified_acs"].steps
    assert len(unified["l0.attn"]) in (6, 7) and unified["l0.attn"][-1] == K - 1
    assert all(s == unified["l0.attn"] for s in unified.values())
    assert sum(k < K // 4 for k in unified["l0.attn"]) >= 4  # updates go where the features move

    for name in NAMES:
        block = rows["blockwise_acs"].steps[name]
        assert block[-1] == K - 1 and len(block) in (6, 7)
        assert sum(k < K // 4 for k in block) >= 4
        assert set(block) <= set(rows["bac"].steps[name])
    assert rows["bac"].n_bubble == 2 and rows["blockwise_acs"].n_bubble is None
    assert list(rows["bac"].calibration["bubble_blocks"]) == ["l0.attn", "l0.cross_attn"]
    assert rows["bac"].computed_fraction() > rows["blockwise_acs"].computed_fraction()


@pytest.mark.parametrize("metric", ["l1", "mse"])
def test_distance_metrics_also_update_early(metric):
    s = from_calibration(features(), BLOCKS, "blockwise_acs", n_updates=6, metric=metric)
    assert all(sum(k < 10 for k in steps) >= 4 for steps in s.steps.values())


def test_from_calibration_is_loud():
    f = features()
    with pytest.raises(ValueError, match="blockwise_acs"):
        from_calibration(f, BLOCKS, "fora", n_updates=5)
    with pytest.raises(ValueError, match="cosine"):
        from_calibration(f, BLOCKS, "bac", n_updates=5, metric="l2")
    with pytest.raises(ValueError, match="l1.ffn"):
        from_calibration({k: v for k, v in f.items() if k != "l1.ffn"}, BLOCKS, "bac", n_updates=5)
    with pytest.raises(ValueError, match="n_bubble"):
        from_calibration(f, BLOCKS, "bac", n_updates=5, n_bubble=7)
