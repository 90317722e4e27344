"""Scripted experts for the robomimic tasks (Lift, Can, Square) and the multi-object scenes (NutAssembly with both
nuts, PickPlace with four objects, two cubes: the expert handles the episode's goal, ``env.goal``), reading
privileged sim state.

Each expert is a small phase machine over end-effector targets: a P-controller on the position,
``a[:3] = clip(kp * (target - eef), -1, 1)``, an orientation controller that keeps the gripper pointing down at a
target yaw (``a[3:6]`` = clipped axis-angle error in the base frame, which OSC_POSE delta takes directly), and an
open/close gripper command. Phase switches test the state (distances, finger opening), not the clock, so the experts
recover from DART-style perturbations (``eval/collect.py --noise``): a dropped object sends them back to the
approach phase. Recipes and their gotchas are in research/feasibility.md §3.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from envs.robomimic import RobomimicEnv

OPEN, CLOSE = -1.0, 1.0
_DOWN = np.diag([1.0, -1.0, -1.0])  # gripper frame at yaw 0: fingers point along -z (world)


def _quat_xyzw_to_mat(q: np.ndarray) -> np.ndarray:
    x, y, z, w = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _rotvec(m: np.ndarray) -> np.ndarray:
    """Axis-angle vector (3,) of a rotation matrix (angle in [0, pi])."""
    cos = np.clip((np.trace(m) - 1.0) / 2.0, -1.0, 1.0)
    angle = np.arccos(cos)
    v = np.array([m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1]])
    if angle < 1e-6:
        return 0.5 * v
    if np.pi - angle < 1e-3:  # near pi the antisymmetric part vanishes: (m + I) / 2 ~ axis axis^T
        aat = (m + np.eye(3)) / 2.0
        i = int(np.argmax(np.diag(aat)))
        axis = aat[:, i] / np.sqrt(aat[i, i])
        if axis @ v < 0:
            axis = -axis
        return angle * axis / np.linalg.norm(axis)
    return angle * v / (2.0 * np.sin(angle))


def _yaw(m: np.ndarray) -> float:
    return float(np.arctan2(m[1, 0], m[0, 0]))


def _body_yaw_wxyz(q: np.ndarray) -> float:
    w, x, y, z = q
    return _yaw(_quat_xyzw_to_mat(np.array([x, y, z, w])))


def _closest_yaw(target: float, current: float, period: float) -> float:
    """The yaw equal to ``target`` modulo ``period`` that is nearest to ``current``."""
    return current + (target - current + period / 2) % period - period / 2


def _wrap(angle: float) -> float:
    return (angle + np.pi) % (2 * np.pi) - np.pi


class Expert:
    """Base: a pick phase machine whose ``(target_pos, target_yaw, grip)`` becomes a 7-d OSC_POSE delta action.

    Phases: approach (hover 10 cm over the grasp point, yaw aligned) -> descend -> grasp (close for
    ``grasp_steps``) -> the task's ``transport`` phases. If the object leaves the hand while it should be held
    (fingers shut on air, or the object farther than ``drop_dist`` from the eef) and it is not yet ``placed``, the
    expert opens, backs up and starts over from the approach.
    """

    kp_pos = 10.0  # action units per metre: 10 cm of error saturates (1 unit = 5 cm of OSC delta)
    kp_rot = 3.0  # action units per radian (1 unit = 0.5 rad of OSC delta)
    grasp_steps = 12  # closing the Panda gripper takes about 10 control steps
    hover_dz = 0.10
    drop_dist = 0.05
    holding_phases: tuple[str, ...] = ("lift",)
    hover_xy = 0.01  # xy alignment over the grasp point required before descending
    abort_xy = 0.02  # xy error that sends a descent back to the hover
    rim_dz = None  # if set: above grasp + rim_dz (fingertips not yet past the object's top) abort at abort_xy

    def __init__(self, env: RobomimicEnv):
        self.env = env
        self.reset()

    @property
    def rs(self):
        """The robosuite env (privileged state)."""
        return self.env.sim_env

    @property
    def sim(self):
        return self.rs.sim

    def reset(self) -> None:
        """Start a new attempt (call at every episode start)."""
        self.phase = "approach"
        self.phase_steps = 0
        self.yaw = None  # grasp yaw, fixed when an attempt starts

    def goto(self, phase: str) -> None:
        self.phase, self.phase_steps = phase, 0

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """The expert action (Da=7,) float32 for ``obs``; advances the phase machine by one step."""
        self.obs = obs
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        rot = _quat_xyzw_to_mat(obs["robot0_eef_quat"])
        target, yaw, grip = self.plan(eef, _yaw(rot))
        self.phase_steps += 1
        action = np.zeros(7)
        action[:3] = np.clip(self.kp_pos * (target - eef), -1.0, 1.0)
        goal = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]]) @ _DOWN
        action[3:6] = np.clip(self.kp_rot * _rotvec(goal @ rot.T), -1.0, 1.0)
        action[6] = grip
        return action.astype(np.float32)

    # ---- task interface
    def grasp_point(self) -> np.ndarray:
        """Where the eef closes on the object (3,)."""
        raise NotImplementedError

    def grasp_yaw(self, eef_yaw: float) -> float:
        """Gripper yaw for the grasp; pick the symmetric copy nearest ``eef_yaw``."""
        raise NotImplementedError

    def object_pos(self) -> np.ndarray:
        """The object position the success check looks at (3,)."""
        raise NotImplementedError

    def placed(self) -> bool:
        """The object is where the success check wants it (ignoring the gripper-distance condition)."""
        return False

    def transport(self, eef: np.ndarray, eef_yaw: float, obj: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Plan for the phases after the grasp."""
        raise NotImplementedError

    # ---- phase machine
    def plan(self, eef: np.ndarray, eef_yaw: float) -> tuple[np.ndarray, float, float]:
        """Return ``(target eef position (3,), target yaw, gripper command)`` and advance the phase machine."""
        grasp = self.grasp_point()
        obj = self.object_pos()
        if self.yaw is None:
            self.yaw = self.grasp_yaw(eef_yaw)
        if self.phase == "approach":
            hover = grasp + [0, 0, self.hover_dz]
            if self.near(eef, hover, xy=self.hover_xy, z=0.03) and abs(_wrap(eef_yaw - self.yaw)) < 0.1:
                self.goto("descend")
            return hover, self.yaw, OPEN
        if self.phase == "descend":
            if abs(eef[2] - grasp[2]) < 0.01 or self.phase_steps > 40:
                self.goto("grasp")
            xy_error = np.linalg.norm((eef - grasp)[:2])
            above_rim = self.rim_dz is not None and eef[2] > grasp[2] + self.rim_dz
            if xy_error > 0.02 or (above_rim and xy_error > self.abort_xy):
                # knocked off line (noise, contact), or about to land a finger on the object's top: hover again
                self.goto("approach")
            return grasp, self.yaw, OPEN
        if self.phase == "grasp":
            if self.phase_steps >= self.grasp_steps:
                self.goto(self.holding_phases[0])
            return grasp, self.yaw, CLOSE
        if self.phase in self.holding_phases and (
            self.gripper_closed_on_air() or np.linalg.norm(obj - eef) > self.drop_dist
        ):
            if not self.placed():  # dropped on the way: open, back off upward, try again
                self.reset()
                return eef + [0, 0, 0.05], eef_yaw, OPEN
            self.goto("release")
        return self.transport(eef, eef_yaw, obj)

    def near(self, eef: np.ndarray, target: np.ndarray, xy: float = 0.01, z: float = 0.01) -> bool:
        d = np.abs(target - eef)
        return bool(d[0] < xy and d[1] < xy and d[2] < z)

    def gripper_closed_on_air(self) -> bool:
        """Both fingers nearly shut: the grasp missed (a held object keeps them >= 3 cm apart)."""
        qpos = self.obs["robot0_gripper_qpos"]  # (2,) finger joints, about +-0.04 open
        return bool(np.abs(qpos[0] - qpos[1]) < 0.01)


class LiftExpert(Expert):
    """Lift: grasp the cube at its centre and yaw (mod pi/2), lift the eef to 25 cm above the table."""

    lift_z = 0.25

    def _cube_body(self) -> int:
        return self.rs.cube_body_id

    def grasp_point(self):
        return self.sim.data.body_xpos[self._cube_body()].copy()

    def grasp_yaw(self, eef_yaw):
        return _closest_yaw(_body_yaw_wxyz(self.sim.data.body_xquat[self._cube_body()]), eef_yaw, np.pi / 2)

    def object_pos(self):
        return self.grasp_point()

    def transport(self, eef, eef_yaw, obj):
        table_z = self.rs.model.mujoco_arena.table_offset[2]
        return np.array([eef[0], eef[1], table_z + self.lift_z]), self.yaw, CLOSE


class CubeExpert(LiftExpert):
    """two_cubes: Lift's recipe on the named cube (``env.goal``: red or green)."""

    def _cube_body(self) -> int:
        return self.env.cube_bodies()[self.env.goals.index(self.env.goal)]


class PlaceExpert(Expert):
    """Pick an object, carry it at a safe height, lower it onto a goal, release and retreat upward.

    The retreat matters: Can and Square count a success only once the gripper is more than ~4 cm from the object
    (``1 - tanh(10 * dist) < 0.6``), so an object left in place under the fingers is not yet a success.
    Subclasses add the goal and the heights.
    """

    carry_z = 0.22  # eef height above the floor while carrying
    retreat_dz = 0.10
    release_steps = 8
    drop_dist = 0.08
    holding_phases = ("lift", "carry", "lower")

    def goal_xy(self) -> np.ndarray:
        """Where the object's (x, y) should end up (2,)."""
        raise NotImplementedError

    def floor_z(self) -> float:
        raise NotImplementedError

    def release_z(self) -> float:
        """Object height (of ``object_pos``) at which to let go over the goal."""
        raise NotImplementedError

    def carry_yaw(self, eef_yaw: float) -> float:
        """Gripper yaw while carrying and lowering (default: keep the grasp yaw)."""
        return self.yaw

    def transport(self, eef, eef_yaw, obj):
        carry_z = self.floor_z() + self.carry_z
        # Steer by where the object is, not where the eef is: the object can slip or swing in the grasp.
        shift = np.zeros(3)
        shift[:2] = self.goal_xy() - obj[:2]
        if self.phase == "lift":
            if eef[2] > carry_z - 0.03:
                self.goto("carry")
            return np.array([eef[0], eef[1], carry_z]), self.yaw, CLOSE
        if self.phase == "carry":
            if np.linalg.norm(shift[:2]) < 0.01:
                self.goto("lower")
            return np.array([*(eef[:2] + shift[:2]), carry_z]), self.carry_yaw(eef_yaw), CLOSE
        if self.phase == "lower":
            if obj[2] < self.release_z():
                self.goto("release")
            target = eef + shift
            target[2] = eef[2] + max(self.release_z() - 0.02 - obj[2], -0.05)
            return target, self.carry_yaw(eef_yaw), CLOSE
        if self.phase == "release":
            if self.phase_steps >= self.release_steps:
                self.goto("retreat")
                self.retreat_target = None
            return eef.copy(), self.yaw, OPEN
        # retreat: straight up from where the first retreat step finds the eef, then stay
        if self.retreat_target is None:
            self.retreat_target = eef + [0, 0, self.retreat_dz]
        return self.retreat_target, self.yaw, OPEN


class CanExpert(PlaceExpert):
    """PickPlaceCan: pick the can from bin 1 at its centre and drop it over its quadrant of bin 2."""

    bin_margin = 0.055  # from the quadrant's walls to the can's centre (can radius 2.5 cm)
    # The open fingers clear the can (about 7 cm across) by ~5 mm a side: align tightly before descending, and
    # rise to realign if a finger is about to land on the rim. The demos then show that recovery.
    hover_xy = 0.004
    abort_xy = 0.007
    rim_dz = 0.02

    def _can(self) -> np.ndarray:
        return self.sim.data.body_xpos[self.rs.obj_body_id["Can"]].copy()

    def grasp_point(self):
        return self._can() + [0, 0, 0.01]

    def grasp_yaw(self, eef_yaw):
        return _closest_yaw(0.0, eef_yaw, np.pi / 2)  # a cylinder: keep the arm's yaw near its home

    def object_pos(self):
        return self._can()

    def goal_xy(self):
        # The quadrant's centre (env.target_bin_placements) lies at the edge of the Panda's reach with the gripper
        # pointing down (the arm stalls ~4 cm short), so aim at the quadrant point nearest the robot base instead.
        rs = self.rs
        bin_id = rs.object_to_id["can"]
        low = np.array(rs.bin2_pos[:2], dtype=np.float64)
        if bin_id in (0, 2):  # same quadrant bounds as PickPlace.not_in_bin
            low[0] -= rs.bin_size[0] / 2
        if bin_id < 2:
            low[1] -= rs.bin_size[1] / 2
        high = low + np.array(rs.bin_size[:2]) / 2
        base = self.sim.data.body_xpos[self.sim.model.body_name2id("robot0_base")][:2]
        return np.clip(base, low + self.bin_margin, high - self.bin_margin)

    def floor_z(self):
        return float(self.rs.bin2_pos[2])

    def release_z(self):
        return self.floor_z() + 0.10  # can centre 4 cm above its resting height: a short, upright drop

    def placed(self):
        return not self.rs.not_in_bin(self._can(), self.rs.object_to_id["can"])


class SquareExpert(PlaceExpert):
    """NutAssemblySquare: grasp the square nut by its handle, centre it over peg 1 and slide it down the peg.

    The gripper yaw equals the nut's yaw (mod pi); research/feasibility.md found that the +pi/2 offset never grasps.
    """

    drop_dist = 0.12  # the eef holds the handle, about 5 cm from the nut centre

    def _nut_body(self) -> int:
        return self.rs.obj_body_id[self.rs.nuts[self.rs.nut_id].name]

    def grasp_point(self):
        return self.sim.data.site_xpos[self.rs.object_site_ids[self.rs.nut_id]].copy()

    def grasp_yaw(self, eef_yaw):
        return _closest_yaw(_body_yaw_wxyz(self.sim.data.body_xquat[self._nut_body()]), eef_yaw, np.pi)

    def object_pos(self):
        return self.sim.data.body_xpos[self._nut_body()].copy()

    def goal_xy(self):
        return self.sim.data.body_xpos[self.rs.peg1_body_id][:2].copy()

    def floor_z(self):
        return float(self.rs.table_offset[2])

    def release_z(self):
        return self.floor_z() + 0.045

    def placed(self):
        return bool(self.rs.on_peg(self.object_pos(), self.rs.nut_id))

    def carry_yaw(self, eef_yaw):
        # Square the nut with the peg (yaw 0 mod pi/2): the hole clears the peg by ~7 mm a side when aligned,
        # by a fraction of a millimetre at 45 degrees. Of the four aligned yaws, skip 0: it points the handle
        # (+x in the nut frame) away from the robot, and the eef would then have to reach 5 cm past the peg,
        # beyond the Panda's reach at carry height. The nut turns with the gripper, so correct by the nut's error.
        nut_yaw = _body_yaw_wxyz(self.sim.data.body_xquat[self._nut_body()])
        errors = [_wrap(k * np.pi / 2 - nut_yaw) for k in (1, 2, 3)]
        return eef_yaw + min(errors, key=abs)


class NutExpert(SquareExpert):
    """NutAssembly (both nuts on the table): the nut the episode names (``env.goal``: square or round) onto its own
    peg (square: peg 1, round: peg 2), with the Square recipe; the round nut's hole makes its yaw free, and the
    same squaring rule keeps its handle towards the robot."""

    @property
    def nut_id(self) -> int:
        return self.rs.nut_to_id[self.env.goal]

    def _nut_body(self) -> int:
        return self.rs.obj_body_id[self.rs.nuts[self.nut_id].name]

    def grasp_point(self):
        return self.sim.data.site_xpos[self.rs.object_site_ids[self.nut_id]].copy()

    def goal_xy(self):
        peg = self.rs.peg1_body_id if self.nut_id == 0 else self.rs.peg2_body_id
        return self.sim.data.body_xpos[peg][:2].copy()

    def placed(self):
        return bool(self.rs.on_peg(self.object_pos(), self.nut_id))


# PickPlace's objects: grasp height above the body origin, the yaw symmetry of a top-down grasp (the fingers close
# along the gripper's y axis; the cereal box is 3 cm thin along its body y and 10 cm wide, so only yaw mod pi grasps
# it), the body origin's height above the object's bottom, and the margin from the quadrant's walls.
PICK_PLACE_OBJECTS: dict[str, dict[str, float]] = {
    "milk": {"grasp_dz": 0.04, "period": np.pi / 2, "bottom": 0.085, "margin": 0.06},
    "bread": {"grasp_dz": 0.0, "period": np.pi / 2, "bottom": 0.045, "margin": 0.06},
    "cereal": {"grasp_dz": 0.04, "period": np.pi, "bottom": 0.10, "margin": 0.07},
    "can": {"grasp_dz": 0.01, "period": np.pi / 2, "bottom": 0.06, "margin": CanExpert.bin_margin},
}


class PickPlaceExpert(CanExpert):
    """PickPlace (four objects in bin 1): the object the episode names (``env.goal``) into its quadrant of bin 2,
    with the Can recipe and per-object grasp height and yaw; carried higher, over the other objects."""

    carry_z = 0.30

    @property
    def spec(self) -> dict[str, float]:
        return PICK_PLACE_OBJECTS[self.env.goal]

    def _body(self) -> int:
        return self.rs.obj_body_id[self.env.goal.capitalize()]

    def _can(self) -> np.ndarray:  # CanExpert's object position: here the named object's
        return self.sim.data.body_xpos[self._body()].copy()

    def grasp_point(self):
        return self._can() + [0, 0, self.spec["grasp_dz"]]

    def grasp_yaw(self, eef_yaw):
        if self.env.goal == "can":
            return super().grasp_yaw(eef_yaw)
        return _closest_yaw(_body_yaw_wxyz(self.sim.data.body_xquat[self._body()]), eef_yaw, self.spec["period"])

    def goal_xy(self):
        rs = self.rs
        low = np.array(rs.bin2_pos[:2], dtype=np.float64)
        bin_id = rs.object_to_id[self.env.goal]
        if bin_id in (0, 2):
            low[0] -= rs.bin_size[0] / 2
        if bin_id < 2:
            low[1] -= rs.bin_size[1] / 2
        high = low + np.array(rs.bin_size[:2]) / 2
        base = self.sim.data.body_xpos[self.sim.model.body_name2id("robot0_base")][:2]
        return np.clip(base, low + self.spec["margin"], high - self.spec["margin"])

    def release_z(self):
        return self.floor_z() + self.spec["bottom"] + 0.04

    def placed(self):
        return not self.rs.not_in_bin(self._can(), self.rs.object_to_id[self.env.goal])


EXPERTS: dict[str, Callable[[RobomimicEnv], Expert]] = {"lift": LiftExpert, "can": CanExpert, "square": SquareExpert,
                                                         "nut_assembly": NutExpert, "pick_place": PickPlaceExpert,
                                                         "two_cubes": CubeExpert}


def make_expert(task: str, env: RobomimicEnv) -> Expert:
    """The scripted expert for ``task`` (one of ``EXPERTS``), acting in ``env``."""
    if task not in EXPERTS:
        raise ValueError(f"no scripted expert for task {task!r}; known: {sorted(EXPERTS)}")
    return EXPERTS[task](env)
