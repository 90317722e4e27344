"""envs/objects.py without the simulator (its table is checked against robosuite in test_robomimic_env.py)."""
from __future__ import annotations

import numpy as np
import pytest

from envs.objects import object_keys, split_objects, task_of_file


def test_split_names_each_object_and_refuses_another_layout():
    x = np.arange(2 * 56, dtype=np.float32).reshape(2, 56)
    parts = split_objects("pick_place", x)
    assert list(parts) == object_keys("pick_place") == ["object_milk", "object_bread", "object_cereal", "object_can"]
    assert np.array_equal(np.concatenate(list(parts.values()), -1), x)
    assert np.array_equal(parts["object_can"], x[:, 42:])
    with pytest.raises(ValueError, match=r"can's object observation has 14 numbers \(can: 14\), got shape \(2, 56\)"):
        split_objects("can", x)
    with pytest.raises(KeyError, match="no object layout for task 'toy'"):
        object_keys("toy")


def test_the_task_of_a_demo_file():
    assert task_of_file('{"env_name": "PickPlaceCan"}') == "can"  # a robomimic file: robosuite's env name
    assert task_of_file({"env_name": "NutAssembly", "wrapper": {"task": "nut_assembly"}}) == "nut_assembly"
    with pytest.raises(ValueError, match="cannot tell the task of a file whose env_args name 'ToyReach'"):
        task_of_file({"env_name": "ToyReach"})
