"""The Bubbling Union Algorithm (BUA): make FFN update steps safe from upstream caching error.

Paper: Ji et al., "Block-wise Adaptive Caching for Accelerating Diffusion Policy", ICLR 2026, Sec. 3.3.

Per-block ACS schedules make an FFN recompute on an input that upstream reuse has already corrupted, and the FFN
passes that error on almost linearly (the paper's Prop. 3.1). BUA picks the n blocks whose features drift most
over the denoising steps, U = top_n(l_j) with l_j the mean pairwise L1 distance of block j's features, and lets
each of them also recompute whenever an FFN at the same or a deeper layer does (the layer being the depth at
which the block runs, measured by the engine; a whole-block unit counts as its layer's FFN):

    C(u) <- C_acs(u) ∪ ⋃_{v ffn, layer(v) >= layer(u)} C_acs(v)      for u in U,

so a fresh FFN computation sees fresh upstream features. Every block then also computes the last step K-1.

Where we differ from the authors' code: n = 1 works (theirs skips BUA below n = 2), and the final step is K-1
for any K (theirs hard-codes 99 for K = 100).
"""
from __future__ import annotations

import numpy as np

from bac.acs import similarity_matrix
from bac.blocks import BlockInfo


def block_errors(features: dict[str, np.ndarray]) -> dict[str, float]:
    """Per block, l_j = mean over step pairs i < j of mean |X_i - X_j|; features (K, D) or (K, N, D).

    (The mean over all K^2 ordered pairs of the paper differs only by the factor (K-1)/K, the same for every
    block, so the ranking is the same.) K = 1 has no pairs and scores 0.
    """
    errors = {}
    for name, x in features.items():
        dist = similarity_matrix(x, "l1")  # (K, K)
        upper = dist[np.triu_indices(len(dist), k=1)]
        errors[name] = float(upper.mean()) if upper.size else 0.0
    return errors


def top_error_blocks(blocks: list[BlockInfo], errors: dict[str, float], n_bubble: int) -> list[str]:
    """U: the names of the ``n_bubble`` blocks with the largest error, ties broken by block order."""
    if not 0 <= n_bubble <= len(blocks):
        raise ValueError(f"n_bubble must be in [0, {len(blocks)}] (the number of blocks), got {n_bubble}")
    missing = [b.name for b in blocks if b.name not in errors]
    if missing:
        raise ValueError(f"no error given for blocks {missing}")
    order = sorted(range(len(blocks)), key=lambda i: (-errors[blocks[i].name], i))
    return [blocks[i].name for i in order[:n_bubble]]


def bubbling_union(
    steps: dict[str, list[int]],
    blocks: list[BlockInfo],
    errors: dict[str, float],
    n_bubble: int,
    num_steps: int,
) -> dict[str, list[int]]:
    """The BAC schedule from the per-block ACS ``steps``: union FFN steps into the top-n blocks, add K-1.

    ``num_steps`` is K. The union reads the input (ACS) schedules only, so the result does not depend on the
    order in which U is processed. ``n_bubble = 0`` means no union: only K-1 is added. Returns sorted step
    lists for every block in ``blocks``.
    """
    missing = [b.name for b in blocks if b.name not in steps]
    if missing:
        raise ValueError(f"no ACS steps given for blocks {missing}")
    for name, s in steps.items():
        bad = [k for k in s if not 0 <= k < num_steps]
        if bad:
            raise ValueError(f"steps {bad} of {name!r} are outside [0, {num_steps})")

    union = {b.name: set(steps[b.name]) for b in blocks}
    for u in top_error_blocks(blocks, errors, n_bubble):
        layer = next(b.layer for b in blocks if b.name == u)
        for v in blocks:
            if v.kind in ("ffn", "block") and v.layer >= layer:  # a whole-block unit holds its layer's FFN
                union[u] |= set(steps[v.name])  # steps, not union: the ACS schedule of v
    return {name: sorted(s | {num_steps - 1}) for name, s in union.items()}
