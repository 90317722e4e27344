"""The registry of cache methods: every name, its typed config (whose defaults are the method's defaults) and
the builder that turns config + model into what the engine runs (a ``Schedule``, a ``Strategy``, or None).

    from bac.methods import build_cache
    cache = build_cache(target, {"name": "bac", "n_updates": 10})   # target: a bac.protocol.CacheTarget
    engine = bac.protocol.attach_to(target, cache)

One file per family: ``rows`` (BAC's ablation rows), ``static`` (the literature's static masks), ``forecast``
(masks + forecasters), ``online`` (threshold triggers), ``tokenwise``. A builder sees the model only through
``bac.protocol`` (``CacheContext``): its blocks, its signature, its calibration, a recorded uncached run.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from bac.methods import forecast, online, rows, static, tokenwise
from bac.methods.context import CacheContext

__all__ = ["CACHE_METHODS", "CacheContext", "LITERATURE_METHODS", "Method", "REGISTRY", "SCHEDULE_METHODS",
           "build_cache", "defaults", "describe", "make_config"]


@dataclass(frozen=True)
class Method:
    name: str
    config: type  # a dataclass; validates its knobs in __post_init__
    build: Callable[[Any, CacheContext], Any]
    family: str
    summary: str


_FAMILIES = {"rows": rows, "static": static, "forecast": forecast, "online": online, "tokenwise": tokenwise}
_ALL = {name: Method(name, cfg, build, family, summary)
        for family, module in _FAMILIES.items() for name, cfg, build, summary in module.METHODS}
SCHEDULE_METHODS = ("none", "uniform", "unified_acs", "blockwise_acs", "bac")  # BAC's ablation rows
LITERATURE_METHODS = ("fora", "delta_dit", "profiling", "ertacache", "teacache", "fbcache", "bwcache", "toca",
                      "taylorseer", "foca", "abcache", "hyca", "bac_forecast")
CACHE_METHODS = SCHEDULE_METHODS + LITERATURE_METHODS
REGISTRY: dict[str, Method] = {name: _ALL[name] for name in CACHE_METHODS}
assert set(REGISTRY) == set(_ALL), sorted(set(_ALL) ^ set(REGISTRY))


def _method(name) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"unknown cache {name!r}; known caches: {list(CACHE_METHODS)}")
    return REGISTRY[name]


def make_config(cfg: Mapping | Any):
    """(name, typed config) from a mapping with ``name`` and the method's knobs (e.g. ``configs/cache/bac.yaml``);
    an unknown name or knob is an error listing the known ones."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        for m in REGISTRY.values():
            if type(cfg) is m.config:
                return m.name, cfg
        raise TypeError(f"{type(cfg).__name__} is not the config of a registered cache method")
    knobs = dict(cfg.items())
    method = _method(str(knobs.pop("name", None)))
    allowed = [f.name for f in dataclasses.fields(method.config)]
    extra = sorted(set(knobs) - set(allowed))
    if extra:
        raise ValueError(f"cache {method.name!r} has no knob {extra}; its knobs: {allowed}")
    return method.name, method.config(**knobs)


def defaults(name: str) -> dict:
    """The method's knobs and their defaults, with its ``name``."""
    method = _method(name)
    return {"name": name, **dataclasses.asdict(method.config())}


def build_cache(target, cfg):
    """What the engine runs for cache config ``cfg`` on ``target`` (a ``bac.protocol.CacheTarget`` or a
    ``CacheContext``): a ``Schedule``, a ``Strategy`` or None (``none``). Schedules are checked against the
    target's signature."""
    name, config = make_config(cfg)
    ctx = target if isinstance(target, CacheContext) else CacheContext(target)
    return REGISTRY[name].build(config, ctx)


def describe(cache) -> dict:
    """What a run's summary records about its schedule or strategy."""
    from bac.schedule import Schedule

    if cache is None:
        return {}
    if isinstance(cache, Schedule):
        return {"method": cache.method, "n_updates": cache.n_updates, "n_bubble": cache.n_bubble,
                "metric": cache.metric, "num_steps": cache.num_steps,
                "computed_fraction": round(cache.computed_fraction(), 4)}
    out = cache.describe()
    if getattr(cache, "fit", None):
        out["fit"] = cache.fit
    return out
