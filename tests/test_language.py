"""The instruction sets of the language-conditioned robomimic tasks (envs/language.py)."""
from __future__ import annotations

import numpy as np
import pytest

from envs.language import INSTRUCTIONS, SPLITS, goal_of, goals, instruction, phrasings


def test_every_goal_has_disjoint_train_and_heldout_phrasings():
    for task, by_goal in INSTRUCTIONS.items():
        for goal, splits in by_goal.items():
            assert len(splits["train"]) >= 2 and len(splits["heldout"]) >= 2, (task, goal)
            assert not set(splits["train"]) & set(splits["heldout"]), (task, goal)
    # within a scene, no phrasing names two goals
    for task in INSTRUCTIONS:
        texts = [t for g in goals(task) for s in SPLITS for t in phrasings(task, g, s)]
        assert len(texts) == len(set(texts)), task


def test_multi_object_scenes_and_their_ids():
    # the goals of a scene are in robosuite's id order (NutAssembly.nut_to_id, PickPlace.object_to_id)
    assert goals("nut_assembly") == ("square", "round")
    assert goals("pick_place") == ("milk", "bread", "cereal", "can")
    assert goals("two_cubes") == ("red", "green")  # Stack's cubeA (red), cubeB (green)
    assert goals("lift") == ("cube",)


def test_instruction_draw_and_inverse():
    rng = np.random.default_rng(0)
    seen = {instruction("pick_place", "milk", "heldout", rng) for _ in range(50)}
    assert seen == set(phrasings("pick_place", "milk", "heldout"))
    for task in INSTRUCTIONS:
        for goal in goals(task):
            for split in SPLITS:
                for text in phrasings(task, goal, split):
                    assert goal_of(task, text) == goal


@pytest.mark.parametrize("call, match", [
    (lambda: phrasings("nut_assembly", "round", "test"), "split must be one of"),
    (lambda: phrasings("nut_assembly", "milk", "train"), "has no goal 'milk'"),
    (lambda: goals("stack"), "no instructions for task 'stack'"),
    (lambda: goal_of("lift", "juggle the cube"), "not an instruction of task 'lift'"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_language_toy_succeeds_only_at_the_named_goal():
    from envs.toy import ToyExpert, ToyReachEnv

    env = ToyReachEnv(language=True, image_size=16, cameras=("agentview",), instructions="heldout")
    expert = ToyExpert(np.random.default_rng(0))
    goals_seen = set()
    for seed in range(8):
        obs, info = env.reset(seed=seed)
        assert obs["instruction"] in phrasings("toy", info["goal"], "heldout")
        assert obs["agentview_image"].shape == (16, 16, 3) and env.observation_space.contains(obs)
        goals_seen.add(info["goal"])
        expert.reset()
        for _ in range(env.horizon):
            obs, _, terminated, truncated, info = env.step(expert.act(obs))
            if terminated or truncated:
                break
        assert terminated and info["placed"] == [env.goal]
    assert goals_seen == {"red", "blue"}
    # driving to the other goal is no success
    obs, info = env.reset(seed=0, options={"goal": "red"})
    other = env._goals["blue"]
    for _ in range(env.horizon):
        obs, _, terminated, truncated, info = env.step(np.clip((other - obs["agent_pos"]) / 0.08, -1, 1))
        if info["placed"] or truncated:
            break
    assert info["placed"] == ["blue"] and not terminated
    with pytest.raises(ValueError, match="one camera, agentview"):
        ToyReachEnv(language=True, cameras=("wrist",))


def test_language_stats_count_the_named_object_apart_from_the_others():
    from bac.rollout import EpisodeResult
    from eval.run import language_stats

    def ep(goal, handled, placed=()):
        return EpisodeResult(seed=0, success=goal in placed, steps=1, reward=0.0, n_chunks=1, sim_time_s=0.0,
                             outcome={"goal": goal, "handled": list(handled), "placed": list(placed)})

    eps = [ep("milk", ["milk"], ["milk"]), ep("milk", ["milk", "can"]), ep("can", ["milk"]), ep("can", [])]
    s = language_stats(eps)
    assert s["n"] == 4 and s["named_handled"] == 0.5 and s["other_handled"] == 0.5 and s["only_named_handled"] == 0.25
    assert s["named_placed"] == 0.25 and s["other_placed"] == 0.0
    lo, hi = s["named_handled_ci95"]
    assert 0.0 < lo < 0.5 < hi < 1.0
    assert s["per_goal"]["milk"]["named_handled"] == 1.0 and s["per_goal"]["milk"]["only_named_handled"] == 0.5
    assert s["per_goal"]["can"]["named_handled"] == 0.0 and s["per_goal"]["can"]["other_handled"] == 0.5
    assert "per_goal" not in language_stats(eps[:2])  # one goal: nothing to break down
    assert language_stats([EpisodeResult(0, True, 1, 1.0, 1, 0.0)]) is None  # a scene without goals
