"""Per-object slots of the robomimic tasks' ``object`` observation, named so that tasks can share them.

robosuite's ``object-state`` concatenates each object's observables in a fixed order: for Can, Square, NutAssembly
and PickPlace 14 numbers per object (its position and quaternion relative to the end effector, then in the world),
for Lift 10 (the cube's position, quaternion and the gripper-to-cube vector; the two cubes of ``two_cubes`` the
same 10 each, gathered from Stack's observables by ``OBJECT_STATE``). The same object has the same 14
numbers in every task it appears in: the can of Can is PickPlace's fourth block, Square's nut NutAssembly's first.
Concatenated as ``object``, they land in different places (a multi-task policy that zero-pads the narrower
``object`` reads Can's can where PickPlace has the milk). Split by name (``object_<name>``), one key per object,
a policy can give each its own token and recognise the can in both tasks.

The table is checked against robosuite's observables in the simulator tests.
"""
from __future__ import annotations

import json

import numpy as np

OBJECTS: dict[str, tuple[tuple[str, int], ...]] = {
    "lift": (("cube", 10),),
    "can": (("can", 14),),
    "square": (("square_nut", 14),),
    "nut_assembly": (("square_nut", 14), ("round_nut", 14)),
    "pick_place": (("milk", 14), ("bread", 14), ("cereal", 14), ("can", 14)),
    "two_cubes": (("red_cube", 10), ("green_cube", 10)),
}
# Tasks whose ``object`` is not robosuite's ``object-state`` but these observables concatenated: Stack's
# object-state (23 numbers) interleaves its two cubes and adds their offset; here each cube is Lift's 10 numbers in
# Lift's order (position, quaternion, gripper-to-cube vector), so the red cube sits where Lift's cube does.
OBJECT_STATE: dict[str, tuple[str, ...]] = {
    "two_cubes": ("cubeA_pos", "cubeA_quat", "gripper_to_cubeA", "cubeB_pos", "cubeB_quat", "gripper_to_cubeB"),
}
PREFIX = "object_"


def object_state(task: str, raw: dict) -> np.ndarray:
    """``object`` of ``task`` from a robosuite observation dict: its ``object-state``, or the observables
    ``OBJECT_STATE`` names for the task, concatenated."""
    keys = OBJECT_STATE.get(task)
    if keys is None:
        return np.asarray(raw["object-state"])
    return np.concatenate([np.asarray(raw[k]).reshape(-1) for k in keys])


def object_keys(task: str) -> list[str]:
    """The per-object observation keys of ``task`` in ``object``'s order."""
    return [PREFIX + name for name, _ in _layout(task)]


def object_widths(task: str) -> dict[str, int]:
    return {PREFIX + name: width for name, width in _layout(task)}


def split_objects(task: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """``object`` (..., W) of ``task`` -> ``{object_<name>: (..., w)}`` (views, no copy)."""
    layout = _layout(task)
    total = sum(w for _, w in layout)
    if x.shape[-1] != total:
        raise ValueError(f"{task}'s object observation has {total} numbers "
                         f"({', '.join(f'{n}: {w}' for n, w in layout)}), got shape {x.shape}")
    out, start = {}, 0
    for name, width in layout:
        out[PREFIX + name] = x[..., start: start + width]
        start += width
    return out


def task_of_file(env_args: str | dict) -> str:
    """Our task name from a demo file's ``env_args`` (JSON or dict): the wrapper's task, else robosuite's env
    name."""
    from envs.robomimic import TASKS  # our task name -> robosuite's env name (here, not at the top: it imports us)

    meta = json.loads(env_args) if isinstance(env_args, str) else dict(env_args)
    by_env_name = {env_name: task for task, env_name in TASKS.items()}
    task = (meta.get("wrapper") or {}).get("task") or by_env_name.get(meta.get("env_name", ""))
    if task not in OBJECTS:
        raise ValueError(f"cannot tell the task of a file whose env_args name {meta.get('env_name')!r}; per-object "
                         f"keys are known for {sorted(OBJECTS)}")
    return task


def _layout(task: str) -> tuple[tuple[str, int], ...]:
    if task not in OBJECTS:
        raise KeyError(f"no object layout for task {task!r}; known: {sorted(OBJECTS)}")
    return OBJECTS[task]
