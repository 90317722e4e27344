"""Announcing the denoising steps of a sampling loop we do not own to a ``bac.sampling.StepCursor``.

lerobot's policies run their own flow-matching loops (XVLA's ``generate_actions``, SmolVLA's ``sample_actions``,
GR00T's ``get_action``): K Euler steps, one denoiser call per step, and no hook for a step cursor. We leave
the loop as it is and wrap its per-step call from outside for the duration of one sampling run:

    with announcing(policy.model.transformer, "forward", cursor, K, t_arg="t"):
        policy.model.generate_actions(...)     # each transformer call is step k = 0, 1, ..., K-1

The wrapper opens ``cursor.session(K)`` around the run and calls ``cursor.step(k, t)`` before the k-th call,
``t`` being the call's own timestep argument. It stands in for the sampler (bac's DESIGN: "the sampler announces
(k, t)"): k is the index of the call within this run, which is the step index because these loops make exactly
one denoiser call per step; the run is refused afterwards if the count is not K. The block wrappers still
never count calls. The wrapper is set with ``bac.wrapping`` (refused if something else already replaced the
callable) and taken off when the run ends, also on an exception, so between runs the model carries nothing.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

from bac.sampling import StepCursor
from bac.wrapping import check_free, install, uninstall


@contextmanager
def announcing(obj, attr: str, cursor: StepCursor | None, num_steps: int, t_arg: str | None = None,
               capture: list | None = None) -> Iterator[None]:
    """Wrap ``obj.<attr>`` (the loop's per-step denoiser call) for one sampling run of ``num_steps`` steps.

    ``cursor``: told each step (None: only counted). ``t_arg``: the keyword argument holding the step's timestep,
    passed on as ``t``. ``capture``: a list that receives ``(args, kwargs)`` of the first call (``cache_call``
    replays it as "one denoiser call as sampling makes it")."""
    label = f"{type(obj).__name__}.{attr}"
    check_free(obj, attr, label)
    calls = [0]

    def make(original):
        def announced(*args, **kwargs):
            k = calls[0]
            if k >= num_steps:
                raise RuntimeError(f"{label} was called more than num_steps={num_steps} times in one sampling run")
            calls[0] = k + 1
            if cursor is not None:
                cursor.step(k, kwargs.get(t_arg) if t_arg else None)
            if capture is not None and k == 0:
                capture.append((args, kwargs))
            return original(*args, **kwargs)

        return announced

    entry = install(obj, attr, make, owner=announcing)
    try:
        with cursor.session(num_steps) if cursor is not None else nullcontext():
            yield
    finally:
        uninstall(entry)
    if calls[0] != num_steps:
        raise RuntimeError(f"{label} ran {calls[0]} times in one sampling run, expected one call per step "
                           f"(num_steps={num_steps}); the loop does not match this adapter")
