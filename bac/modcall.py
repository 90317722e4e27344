"""Calling a module without ``nn.Module.__call__``'s overhead where nothing would notice.

On a CPU, ``module(x)`` spends 1-3 us in two Python frames and a dozen checks before ``forward`` runs,
and each attribute lookup of a submodule, parameter or buffer (``self.head``, ``self.weight``) another
~1 us through ``nn.Module.__getattr__``. For the small per-step pieces of a sampler (input embedding,
final norm, head) that is as much as the ops themselves, and with the heavy blocks cached it is a visible
share of a denoising step. A model can :func:`bind` those pieces once per sampling run instead.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module


def needs_module_call(module: nn.Module) -> bool:
    """Whether calling ``module.forward`` directly could differ from ``module(...)``: the module has hooks,
    global module hooks are registered (e.g. by ``FlopCounterMode``), it was compiled with
    ``module.compile()``, or a JIT trace is running."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
        or module._compiled_call_impl is not None
        or _module._global_forward_hooks or _module._global_forward_pre_hooks
        or _module._global_backward_hooks or _module._global_backward_pre_hooks
        or torch._C._get_tracing_state()
    )


def bind(module: nn.Module) -> Callable:
    """A callable that computes ``module(...)`` for the length of one sampling run, during which the module's
    parameters, hooks and forward must stay as they are (bind again for the next run):

    - the module itself where :func:`needs_module_call` says so;
    - for an ``nn.Linear`` or ``nn.LayerNorm`` (exactly that class, forward not replaced on the instance),
      their forward's functional op over the module's own tensors, looked up once;
    - otherwise the module's ``forward`` (a forward set on the instance, such as a cache engine's
      wrapper, included).

    The ops, and so the results, are the same as the module call's, bit for bit.
    """
    if needs_module_call(module):
        return module
    if "forward" not in module.__dict__:
        if type(module) is nn.Linear:
            weight, bias = module.weight, module.bias
            return lambda x: F.linear(x, weight, bias)
        if type(module) is nn.LayerNorm:
            shape, weight, bias, eps = module.normalized_shape, module.weight, module.bias, module.eps
            return lambda x: F.layer_norm(x, shape, weight, bias, eps)
    return module.forward
