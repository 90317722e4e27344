"""Instructions for the language-conditioned robomimic tasks: for every (task, goal) a set of training phrasings
and a disjoint set of held-out paraphrases, used only for evaluation (a policy that learned the words of its
training instructions, not what they name, fails on them).

A goal is what the instruction names in the scene: the round or the square nut of NutAssembly, one of the four
objects of PickPlace, the red or the green cube of ``two_cubes``; Lift, Can and Square have one goal each.
``instruction(task, goal, split, rng)`` draws one phrasing; ``goal_of(task, text)`` inverts an exact phrasing (for
demo files and tests).
"""
from __future__ import annotations

import numpy as np

SPLITS = ("train", "heldout")

# task -> goal -> split -> phrasings. The goals of a multi-goal task are listed in their robosuite id order
# (NutAssembly.nut_to_id, PickPlace.object_to_id).
INSTRUCTIONS: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {
    "toy": {  # envs/toy.py with language=True: two coloured goals above the wall
        "red": {"train": ("go to the red dot", "reach the red goal"),
                "heldout": ("move to the crimson marker", "head for the scarlet spot")},
        "blue": {"train": ("go to the blue dot", "reach the blue goal"),
                 "heldout": ("move to the navy marker", "head for the azure spot")},
    },
    "lift": {
        "cube": {
            "train": ("lift the cube", "pick up the red cube", "raise the cube off the table"),
            "heldout": ("grab the block and hold it up", "take the small cube and lift it into the air"),
        },
    },
    "can": {
        "can": {
            "train": ("put the can in its bin", "place the soda can into its bin", "move the can to the bin"),
            "heldout": ("drop the tin into its compartment", "carry the drink can over to its box"),
        },
    },
    "square": {
        "square": {
            "train": ("put the square nut on the peg", "fit the square nut onto the peg",
                      "place the nut on the peg"),
            "heldout": ("slide the nut with the square hole down the post", "thread the square ring over the pin"),
        },
    },
    "nut_assembly": {
        "square": {
            "train": ("put the square nut on its peg", "place the square nut onto the square peg",
                      "fit the square nut over its peg"),
            "heldout": ("slide the nut with the square hole down its post", "thread the square ring over its pin"),
        },
        "round": {
            "train": ("put the round nut on its peg", "place the round nut onto the round peg",
                      "fit the round nut over its peg"),
            "heldout": ("slide the ring-shaped nut down its post", "thread the circular nut over its pin"),
        },
    },
    "pick_place": {
        "milk": {
            "train": ("put the milk in its bin", "place the milk carton into its bin", "move the milk to its bin"),
            "heldout": ("drop the carton of milk into its compartment", "carry the dairy carton over to its box"),
        },
        "bread": {
            "train": ("put the bread in its bin", "place the loaf of bread into its bin", "move the bread to its bin"),
            "heldout": ("drop the loaf into its compartment", "carry the baked loaf over to its box"),
        },
        "cereal": {
            "train": ("put the cereal in its bin", "place the cereal box into its bin", "move the cereal to its bin"),
            "heldout": ("drop the box of cornflakes into its compartment", "carry the breakfast box over to its box"),
        },
        "can": {
            "train": ("put the can in its bin", "place the soda can into its bin", "move the can to its bin"),
            "heldout": ("drop the tin into its compartment", "carry the drink can over to its box"),
        },
    },
    # robosuite's Stack scene: a red cube (cubeA, 4 cm) and a green one (cubeB, 5 cm). The held-out phrasings keep
    # the colour word in new sentences (as CALVIN's do); colour synonyms would test the frozen text encoder more
    # than the policy: in MiniLM's token outputs "emerald" is as near "red" as "green" (cosine 0.22 and 0.21).
    "two_cubes": {
        "red": {
            "train": ("lift the red cube", "pick up the red block", "raise the red cube off the table"),
            "heldout": ("grab the red block and hold it up", "take the red cube and lift it into the air"),
        },
        "green": {
            "train": ("lift the green cube", "pick up the green block", "raise the green cube off the table"),
            "heldout": ("grab the green block and hold it up", "take the green cube and lift it into the air"),
        },
    },
}


def goals(task: str) -> tuple[str, ...]:
    """The goals of ``task`` in robosuite id order."""
    if task not in INSTRUCTIONS:
        raise ValueError(f"no instructions for task {task!r}; known: {sorted(INSTRUCTIONS)}")
    return tuple(INSTRUCTIONS[task])


def phrasings(task: str, goal: str, split: str) -> tuple[str, ...]:
    if split not in SPLITS:
        raise ValueError(f"instruction split must be one of {SPLITS}, got {split!r}")
    if goal not in goals(task):
        raise ValueError(f"task {task!r} has no goal {goal!r}; its goals: {goals(task)}")
    return INSTRUCTIONS[task][goal][split]


def instruction(task: str, goal: str, split: str, rng: np.random.Generator) -> str:
    """One phrasing of ``goal`` from ``split``, drawn with ``rng``."""
    options = phrasings(task, goal, split)
    return options[int(rng.integers(len(options)))]


def goal_of(task: str, text: str) -> str:
    """The goal an exact phrasing (of either split) names."""
    for goal, splits in INSTRUCTIONS[task].items():
        if any(text in splits[s] for s in SPLITS):
            return goal
    raise ValueError(f"{text!r} is not an instruction of task {task!r}")
