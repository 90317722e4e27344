"""envs/objects.py without the simulator (its table is checked against robosuite in test_robomimic_env.py)."""
from __future__ import annotations

import numpy as np
import pytest

from envs.objects import object_keys, object_state, split_objects, task_of_file


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


def test_two_cubes_gathers_each_cube_in_lifts_layout():
    """Stack's object-state interleaves the cubes; two_cubes' ``object`` is each cube's position, quaternion and
    gripper-to-cube vector (Lift's 10), red then green."""
    raw = {"cubeA_pos": [1, 2, 3], "cubeA_quat": [4, 5, 6, 7], "cubeB_pos": [11, 12, 13], "cubeB_quat": [14, 15, 16, 17],
           "cubeA_to_cubeB": [9, 9, 9], "gripper_to_cubeA": [8, 8, 8], "gripper_to_cubeB": [18, 18, 18],
           "object-state": np.zeros(23)}
    x = object_state("two_cubes", raw)
    assert x.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 11, 12, 13, 14, 15, 16, 17, 18, 18, 18]
    parts = split_objects("two_cubes", x)
    assert list(parts) == ["object_red_cube", "object_green_cube"] and parts["object_green_cube"][0] == 11
    assert object_state("lift", {"object-state": np.arange(10)}).tolist() == list(range(10))


def test_the_task_of_a_demo_file():
    assert task_of_file('{"env_name": "PickPlaceCan"}') == "can"  # a robomimic file: robosuite's env name
    assert task_of_file({"env_name": "NutAssembly", "wrapper": {"task": "nut_assembly"}}) == "nut_assembly"
    with pytest.raises(ValueError, match="cannot tell the task of a file whose env_args name 'ToyReach'"):
        task_of_file({"env_name": "ToyReach"})
