"""How much a reuse at each denoising step moves the final output, per unit of feature drift: the step weights
of output-weighted ACS (``cache.weights=output`` on the calibrated rows).

ACS (``bac.acs``) spends a block's S updates where its feature drifts most. Feature drift is not output error:
on a trained image DiT under DDIM-50 the features drift 50-150x more at the last steps than in the middle, but a
reuse there moves the final image no more than one in the middle, because the sampler scales the model's
output by ever smaller coefficients as the noise vanishes (docs/dit_image.md has the measurement). Unweighted
ACS then crowds its updates into the last steps and loses to uniform reuse at equal compute.

The weight of step k (k >= 1) is measured, not modelled: run the uncached sample once, then once per step with
every block reusing its step-(k-1) output at step k alone, and divide the final output's relative L2 change by
the mean cosine drift of the blocks between k-1 and k (the calibration's similarity matrices):
    w_k = ||x_final(reuse at k) - x_final|| / ||x_final||  /  mean_b (1 - cos_b[k-1, k])
(w_0 := w_1: step 0 always computes). ACS then maximizes sum_m sum_t w_t sim[c_m, t] (``acs_steps`` on
``sim * w[None, :]``): a replaced step costs its drift times what that drift does to the output.
Cost: K - 1 extra sampling runs over n calibration inputs, once per model, sampler and K.

Shapes: K denoising steps; w (K,), mean 1.
"""
from __future__ import annotations

import numpy as np
import torch

from bac.schedule import Schedule


def _final(target, cursor, n: int, seed: int) -> torch.Tensor:
    out = target.cache_sample(cursor, n, seed)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{type(target).__name__}.cache_sample must return its final output (a tensor) for "
                        f"output-weighted schedules; it returned {type(out).__name__}")
    return out.detach().double()


def measure_step_weights(target, calibration, n: int = 4, seed: int = 0) -> np.ndarray:
    """w (K,) for ``target`` (a ``bac.protocol.CacheTarget`` whose ``cache_sample`` returns its output) from its
    ``calibration`` (a ``bac.calibration.Calibration``: the blocks and their cosine similarity matrices)."""
    from bac.protocol import attach_to

    K = calibration.num_steps
    if "cosine" not in calibration.sims:
        raise ValueError(f"the calibration has no cosine matrices (it has {sorted(calibration.sims)})")
    names = [b.name for b in calibration.blocks]
    sig = target.cache_signature()
    ref = _final(target, None, n, seed)
    scale = ref.norm().clamp_min(1e-12)
    cos = calibration.sims["cosine"].astype(np.float64)  # (n_blocks, K, K)
    w = np.zeros(K)
    for k in range(1, K):
        # a plain per-block mask (labelled "uniform": it carries no calibration), reuse at step k only
        mask = Schedule(names, {b: [s for s in range(K) if s != k] for b in names}, K, "uniform",
                        scheduler=sig.scheduler, model_hash=sig.model_hash)
        engine = attach_to(target, mask)
        try:
            out = _final(target, engine, n, seed)
        finally:
            engine.detach()
        drift = float(np.mean(1 - cos[:, k - 1, k]))
        w[k] = float((out - ref).norm() / scale) / max(drift, 1e-9)
    w[0] = w[1] if K > 1 else 1.0
    if not np.isfinite(w).all() or w.sum() <= 0:
        raise FloatingPointError(f"step weights are not finite and positive: {w}")
    return w / w.mean()
