"""The peers: other tools' accelerations of a diffusers transformer, applied from outside in the same process, so
``eval/generate.py`` measures them beside bac's methods on the same model, noise and clock.

    peer = build_peer({"name": "diffusers_fbcache", "threshold": 0.1}, model, calibrate=None)
    peer.apply()                              # the tool's hooks and our counting hooks
    with peer.call_context():                 # one full sampling call: fresh tool state, counts restart
        x = gen.sample(labels, noise=noise, num_inference_steps=peer.num_inference_steps)
    peer.block_fraction()                     # attention/FF work computed in that call, in [0, 1]
    peer.remove()                             # the model as before: same attributes, same outputs

``fewer_steps``: no cache, fewer DDIM steps. diffusers 0.42.1 ``diffusers.hooks``: ``apply_first_block_cache``,
``apply_taylorseer_cache``, ``apply_pyramid_attention_broadcast``, ``apply_mag_cache`` (mag_ratios from its own
``calibrate=True`` mode, run on the model) and ``apply_faster_cache`` with their ``*Config``s. DiT is no
``CacheMixin``: ``call_context`` resets the hooks' state and sets their ``CacheContext("cond")`` itself; PAB and
FasterCache read the timestep from a forward pre-hook on the transformer (a host read per callback). cache-dit
1.5.3: ``cache_dit.enable_cache(model, cache_config=DBCacheConfig(...))``, ``refresh_context`` per sample,
``disable_cache``. ``block_fraction`` counts calls of the first ``nn.Linear`` of every attention and feed-forward
module (no tool hooks below them), weighted by the module's linear parameters (FLOPs per token; attention's
token-token products left out).

Not applicable (``NotApplicable`` says why): FBCache, MagCache, DBCache on Latte: they add a residual "last block's
output - first block's input/output", but Latte runs ``transformer_blocks[i]`` on (B*F, N, D) tokens and
``temporal_transformer_blocks[i]`` on (B*N, F, D), permuting in between (diffusers fails on a size mismatch;
cache-dit has no Latte adapter). FasterCache's CFG-Cache half wants [uncond, cond] halves in ``hidden_states`` /
``encoder_hidden_states`` kwargs; the DiT backend batches [cond, uncond] and passes ``class_labels``, which it does
not split: the peer runs it ``is_guidance_distilled`` (attention reuse only). diffusers' TaylorSeer default patterns
(``^transformer_blocks.*attn``, full match) match no DiT or Latte module (``attn1``/``attn2``); ours name attn1/2, ff.

cache-dit 1.5.3 declares torch>=2.7.1, diffusers>=0.36.0 (met by 2.13.0 and 0.42.1, not upgraded) and
transformers>=4.55.2 (pip would add transformers 5.24.0, tokenizers, pydantic, typer, rich), which DBCache does not
import: ``pip install --no-deps cache-dit==1.5.3`` runs. Its ``disable_cache`` leaves DiT's patched forward,
``_is_patched``, stats attributes and a ``_norm1_emb`` submodule (an extra state_dict entry); ``remove`` restores
every module's instance attributes as they were at ``apply``.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Iterator, Mapping

from torch import nn

from bac.wrapping import _MARK  # marks the engine's wrappers


class NotApplicable(ValueError):
    """A peer cannot apply to this model; the message says why."""


def _knob(default, low=None, high=None, none=False, choices=None, span=False):
    """A config field with its allowed values: in [``low``, ``high``] (an int if the default is; None too if
    ``none``), one of ``choices``, or a timestep span [low, high], low < high (hydra gives lists; kept as tuples)."""
    return field(default=default, metadata=dict(low=low, high=high, none=none, choices=choices, span=span))


class Knobs:
    """Validates its dataclass fields against their ``_knob`` metadata; ``peer`` names it in messages."""

    peer = ""

    def __post_init__(self):
        for f in fields(self):
            v, m = getattr(self, f.name), f.metadata
            if m.get("span"):
                ok, allowed = len(v) == 2 and v[0] < v[1], "a timestep span [low, high] with low < high"
                setattr(self, f.name, tuple(v))
            elif m.get("choices"):
                ok, allowed = v in m["choices"], f"one of {list(m['choices'])}"
            elif m.get("low") is not None:
                kind = int if isinstance(f.default, int) or f.default is None else (int, float)
                ok = (v is None and m["none"]) or (isinstance(v, kind) and not isinstance(v, bool) and m["low"] <= v
                                                   and (m["high"] is None or v <= m["high"]))
                allowed = (("None or " if m["none"] else "") + ("an int " if kind is int else "")
                           + (f">= {m['low']}" if m["high"] is None else f"in [{m['low']}, {m['high']}]"))
            else:
                continue
            if not ok:
                raise ValueError(f"{self.peer}: {f.name} must be {allowed}, got {v!r}")


# ------------------------------------------------------------------------------------------------------ configs
@dataclass
class FewerStepsConfig(Knobs):
    peer = "fewer_steps"
    num_inference_steps: int = _knob(25, low=1)


@dataclass
class FBCacheConfig(Knobs):
    peer, latte_why = "diffusers_fbcache", "FirstBlockCache adds 'last block output - first block output'"
    threshold: float = _knob(0.05, low=0)  # diffusers' default; 0: every step

    def install(self, p):
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        apply_first_block_cache(p.model, FirstBlockCacheConfig(threshold=self.threshold))


@dataclass
class TaylorSeerConfig(Knobs):
    peer = "diffusers_taylorseer"
    cache_interval: int = _knob(5, low=1)  # 1: every step
    disable_cache_before_step: int = _knob(3, low=0)
    disable_cache_after_step: int | None = _knob(None, low=1, none=True)
    max_order: int = _knob(1, low=0)
    taylor_factors_dtype: str = _knob("float32", choices=("float32", "bfloat16", "float16"))
    cache_identifiers: tuple[str, ...] = (r"(temporal_)?transformer_blocks\.\d+\.(attn1|attn2|ff)",)

    def install(self, p):
        import torch
        from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

        apply_taylorseer_cache(p.model, TaylorSeerCacheConfig(**{
            **asdict(self), "taylor_factors_dtype": getattr(torch, self.taylor_factors_dtype),
            "cache_identifiers": list(self.cache_identifiers)}))


@dataclass
class PABConfig(Knobs):
    """diffusers searches its identifiers anywhere in a name, so its spatial ones ("transformer_blocks") also catch
    Latte's temporal_transformer_blocks; ``install`` anchors them."""

    peer = "diffusers_pab"
    spatial_attention_block_skip_range: int | None = _knob(2, low=1, none=True)  # 1: every step
    temporal_attention_block_skip_range: int | None = _knob(None, low=1, none=True)
    cross_attention_block_skip_range: int | None = _knob(None, low=1, none=True)
    spatial_attention_timestep_skip_range: tuple[int, int] = _knob((100, 800), span=True)
    temporal_attention_timestep_skip_range: tuple[int, int] = _knob((100, 800), span=True)
    cross_attention_timestep_skip_range: tuple[int, int] = _knob((100, 800), span=True)

    def __post_init__(self):
        super().__post_init__()
        if all(getattr(self, f"{k}_attention_block_skip_range") is None for k in ("spatial", "temporal", "cross")):
            raise ValueError(f"{self.peer}: a block skip range must be set for spatial, temporal or cross attention")

    def install(self, p):
        from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

        blocks = (r"^(transformer_)?blocks\.",)
        apply_pyramid_attention_broadcast(p.model, PyramidAttentionBroadcastConfig(
            **asdict(self), spatial_attention_block_identifiers=blocks, cross_attention_block_identifiers=blocks,
            temporal_attention_block_identifiers=(r"^temporal_transformer_blocks\.",),
            current_timestep_callback=p.timestep))


@dataclass
class MagCacheConfig(Knobs):
    peer, latte_why = "diffusers_magcache", "MagCache adds 'last block output - first block input'"
    threshold: float = _knob(0.06, low=0)
    max_skip_steps: int = _knob(3, low=0)  # 0: every step
    retention_ratio: float = _knob(0.2, low=0, high=1)
    mag_ratios: list[float] | None = None  # None: calibrated on the model, one ratio per step of calibrate()

    def install(self, p):
        from diffusers.hooks import MagCacheConfig as Config
        from diffusers.hooks import apply_mag_cache

        r = p.ratios  # None: calibration mode, with no end-of-run reset (the ratios stay in the state)
        apply_mag_cache(p.model, Config(calibrate=True, num_inference_steps=2**31) if r is None else
                        Config(threshold=self.threshold, max_skip_steps=self.max_skip_steps, mag_ratios=list(r),
                               retention_ratio=self.retention_ratio, num_inference_steps=len(r)))


@dataclass
class FasterCacheConfig(Knobs):
    peer = "diffusers_fastercache"
    spatial_attention_block_skip_range: int = _knob(2, low=1)  # 1: every step
    temporal_attention_block_skip_range: int | None = _knob(None, low=1, none=True)
    spatial_attention_timestep_skip_range: tuple[int, int] = _knob((-1, 681), span=True)
    temporal_attention_timestep_skip_range: tuple[int, int] = _knob((-1, 681), span=True)
    attention_weight: float = _knob(0.5, low=0)  # diffusers' default w in the extrapolation t + w (t - t_2)

    def install(self, p):
        from diffusers.hooks import FasterCacheConfig as Config
        from diffusers.hooks import apply_faster_cache

        lo, hi = self.spatial_attention_timestep_skip_range

        def timestep() -> float:
            t = p.timestep()
            if p.calls == 1 and lo < t < hi:  # diffusers would read its empty cache
                raise ValueError(f"{self.peer}: the first step's timestep {t} lies in "
                                 f"spatial_attention_timestep_skip_range {(lo, hi)}; nothing is cached there yet")
            return t

        knobs, w = asdict(self), self.attention_weight
        knobs.pop("attention_weight")
        apply_faster_cache(p.model, Config(
            **knobs, is_guidance_distilled=True, attention_weight_callback=lambda _: w,
            current_timestep_callback=timestep,
            tensor_format="BCFHW" if hasattr(p.model, "temporal_transformer_blocks") else "BCHW"))


@dataclass
class DBCacheConfig(Knobs):
    peer, latte_why = "cachedit_dbcache", "cache-dit 1.5.3 has no adapter for it and runs one block list as one run"
    Fn_compute_blocks: int = _knob(1, low=1)
    Bn_compute_blocks: int = _knob(0, low=0)
    residual_diff_threshold: float = _knob(0.08, low=0)  # 0: every step
    max_warmup_steps: int = _knob(8, low=0)
    warmup_interval: int = _knob(1, low=1)
    max_cached_steps: int = _knob(-1, low=-1)  # -1: no limit
    max_continuous_cached_steps: int = _knob(-1, low=-1)


# -------------------------------------------------------------------------------------------------------- peers
def _snapshot(model: nn.Module) -> list:
    """Every module's instance attributes and the items of its dict-valued ones (submodules, parameters, hooks)."""
    return [(m, dict(vars(m)), {k: list(v.items()) for k, v in vars(m).items() if isinstance(v, dict)})
            for m in model.modules()]


def _restore(saved: list) -> None:
    for m, attrs, dicts in saved:
        state = vars(m)
        for k in [k for k in state if k not in attrs]:
            del state[k]
        state.update({k: v for k, v in attrs.items() if state.get(k) is not v})
        for k, items in dicts.items():
            if len(state[k]) != len(items) or any(state[k].get(a) is not b for a, b in items):
                state[k].clear()
                state[k].update(items)


@contextmanager
def _quiet() -> Iterator[None]:
    """diffusers warns on every FasterCache apply ("purely experimental"); the timing loop applies it each round."""
    log, level = logging.getLogger("diffusers"), logging.getLogger("diffusers").level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class Peer:
    """Counting hooks, the current timestep and an exact undo; subclasses install the tool in ``_install``, take it
    off in ``_uninstall`` and reset its per-run state in ``_begin``."""

    def __init__(self, config: Knobs, model: nn.Module, calibrate: Callable[[], None] | None = None):
        from diffusers.models.attention import AttentionModuleMixin, FeedForward
        from diffusers.models.attention_processor import Attention

        name, why = config.peer, getattr(config, "latte_why", None)
        if why and hasattr(model, "temporal_transformer_blocks"):
            raise NotApplicable(f"{name} cannot apply to {type(model).__name__}: {why}, but its forward runs "
                                "transformer_blocks[i] on (B*F, N, D) tokens and temporal_transformer_blocks[i] on "
                                "(B*N, F, D), permuting in between")
        self.name, self.config, self.model = name, config, model
        self.num_inference_steps: int | None = getattr(config, "num_inference_steps", None)
        units = [[x for x in m.modules() if isinstance(x, nn.Linear)] for m in model.modules()
                 if isinstance(m, (Attention, AttentionModuleMixin, FeedForward))]
        self._units = [(u[0], sum(x.weight.numel() for x in u)) for u in units if u]  # (first linear, weight)
        self._counts = [0] * len(self._units)
        self.calls, self._t, self._saved, self._handles, self._counting = 0, None, None, [], False

    def apply(self, count: bool = True) -> None:
        """Install the tool; with ``count``, also the hooks that count block calls for ``block_fraction`` (left
        out of timed runs: the engine's timed runs carry no counters either)."""
        if self._saved is not None:
            raise RuntimeError(f"{self.name} is already applied; remove() it first")
        if any(getattr(v, _MARK, None) is not None for m in self.model.modules() for v in vars(m).values()):
            raise RuntimeError(f"a bac engine is attached to {type(self.model).__name__}; detach it before a peer")
        self._saved, self._counting = _snapshot(self.model), count
        self._handles = [self.model.register_forward_pre_hook(self._on_call, with_kwargs=True)]
        counts = self._counts
        for i, (leaf, _) in enumerate(self._units if count else ()):
            self._handles.append(leaf.register_forward_pre_hook(lambda m, a, i=i: counts.__setitem__(i, counts[i] + 1)))
        try:
            with _quiet():
                self._install()
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        if self._saved is None:
            return
        try:
            with _quiet():
                self._uninstall()
        finally:
            for h in self._handles:
                h.remove()
            _restore(self._saved)
            self._saved, self._handles = None, []

    @contextmanager
    def call_context(self) -> Iterator[None]:
        """Wrap one full sampling call: the tool's state starts fresh and the counts restart."""
        if self._saved is None:
            raise RuntimeError(f"{self.name}.call_context() before apply()")
        self.calls, self._counts[:] = 0, [0] * len(self._counts)
        self._begin()
        try:
            yield
        finally:
            self._end()

    def block_fraction(self) -> float | None:
        """Parameter-weighted fraction of attention/FF calls computed in the last sample (None: none ran, or it
        ran applied with ``count=False``)."""
        if not self._counting:
            return None
        total = self.calls * sum(w for _, w in self._units)
        return sum(w * c for (_, w), c in zip(self._units, self._counts)) / total if total else None

    def timestep(self) -> float:
        """The timestep of the transformer call in progress (a host read)."""
        return float(self._t.reshape(-1)[0])

    def _on_call(self, module, args, kwargs):
        self.calls += 1
        self._t = kwargs.get("timestep", args[1] if len(args) > 1 else None)

    def _install(self) -> None: ...
    def _uninstall(self) -> None: ...
    def _begin(self) -> None: ...
    def _end(self) -> None: ...


class DiffusersPeer(Peer):
    """A diffusers ``apply_*`` hook (``config.install``); ``remove`` takes off exactly the hooks it registered."""

    def __init__(self, config: Knobs, model: nn.Module, calibrate: Callable[[], None] | None = None):
        super().__init__(config, model)
        self.ratios, self._own = getattr(config, "mag_ratios", None), []
        self.apply()  # a dry run: fail now if the config matches nothing
        self.remove()
        if isinstance(config, MagCacheConfig) and self.ratios is None:
            if calibrate is None:
                raise ValueError(f"{self.name} needs mag_ratios or a calibrate callable (one uncached sample)")
            self.apply()  # calibration mode: nothing skipped, one magnitude ratio per step recorded
            try:
                with self.call_context():
                    calibrate()
                    registry, key = self._own[0]
                    self.ratios = list(registry.hooks[key].state_manager.get_state().calibration_ratios)
            finally:
                self.remove()

    def _hooks(self) -> list:
        return [(m._diffusers_hook, k) for m in self.model.modules() if hasattr(m, "_diffusers_hook")
                for k in m._diffusers_hook.hooks]

    def _install(self) -> None:
        before = {(id(r), k) for r, k in self._hooks()}
        self.config.install(self)
        self._own = [(r, k) for r, k in self._hooks() if (id(r), k) not in before]
        if not self._own:
            raise NotApplicable(f"{self.name}: its config matches no module of {type(self.model).__name__}")

    def _uninstall(self) -> None:
        for registry, k in reversed(self._own):
            registry.remove_hook(k, recurse=False)

    def _begin(self, context: str | None = "cond") -> None:
        from diffusers.hooks.hooks import CacheContext, StateManager

        for registry, k in self._own:
            hook = registry.hooks[k]
            if hook._is_stateful:
                hook.reset_state(registry._module_ref)
            for v in vars(hook).values():
                if isinstance(v, StateManager):
                    v.set_context(None if context is None else CacheContext(context))

    def _end(self) -> None:
        self._begin(None)  # drop the run's cached tensors


class DBCachePeer(Peer):
    """cache-dit's Dual Block Cache: the first Fn blocks always run; while their residual changes by less than the
    threshold (relative L1) the middle blocks reuse their cached residual; the last Bn blocks always run."""

    def __init__(self, config: DBCacheConfig, model: nn.Module, calibrate: Callable[[], None] | None = None):
        super().__init__(config, model)
        os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # read at import; it logs every apply otherwise
        try:
            import cache_dit
        except ImportError as e:
            raise ImportError(f"{self.name} needs cache-dit: pip install --no-deps cache-dit==1.5.3 (the [peers] "
                              "extra; eval/peers.py says why --no-deps)") from e
        self._cd = cache_dit
        n, used = len(getattr(model, "transformer_blocks", ())), config.Fn_compute_blocks + config.Bn_compute_blocks
        if used > n:
            raise ValueError(f"{self.name}: Fn_compute_blocks + Bn_compute_blocks must be <= the model's {n} "
                             f"blocks, got {used}")

    def _install(self) -> None:
        self._cd.enable_cache(self.model, cache_config=self._cd.DBCacheConfig(**asdict(self.config)))

    def _uninstall(self) -> None:
        self._cd.disable_cache(self.model)

    def _begin(self) -> None:
        self._cd.refresh_context(self.model)  # a fresh context: nothing cached from the previous sample


def _factory(cls: type[Peer], config_cls: type[Knobs]) -> Callable[[Mapping, nn.Module, Callable | None], Peer]:
    def make(cfg: Mapping, model: nn.Module, calibrate: Callable[[], None] | None = None) -> Peer:
        knobs, known = {k: v for k, v in cfg.items() if k != "name"}, [f.name for f in fields(config_cls)]
        if bad := sorted(set(knobs) - set(known)):
            raise ValueError(f"{config_cls.peer}: unknown knobs {bad}; known: {known}")
        return cls(config_cls(**knobs), model, calibrate)
    return make


_KINDS = [(Peer, FewerStepsConfig), (DiffusersPeer, FBCacheConfig), (DiffusersPeer, TaylorSeerConfig),
          (DiffusersPeer, PABConfig), (DiffusersPeer, MagCacheConfig), (DiffusersPeer, FasterCacheConfig),
          (DBCachePeer, DBCacheConfig)]
CONFIGS: dict[str, type[Knobs]] = {c.peer: c for _, c in _KINDS}
PEERS: dict[str, Callable[[Mapping, nn.Module, Callable[[], None] | None], Peer]] = {
    c.peer: _factory(cls, c) for cls, c in _KINDS}


def build_peer(cfg: Mapping, model: nn.Module, calibrate: Callable[[], None] | None = None) -> Peer:
    """The peer ``cfg["name"]`` with ``cfg``'s other keys as its knobs, for ``model``: a diffusers transformer, or a
    module holding one (the outermost is used; dit_video wraps Latte); ``calibrate`` runs one uncached sample
    (MagCache calibrates on it)."""
    from diffusers import ModelMixin

    if cfg.get("name") not in PEERS:
        raise ValueError(f"unknown peer {cfg.get('name')!r}; known peers: {list(PEERS)}")
    inner = next((m for m in model.modules() if isinstance(m, ModelMixin)), None)
    if inner is None:
        raise NotApplicable(f"{cfg['name']}: {type(model).__name__} holds no diffusers model")
    return PEERS[cfg["name"]](cfg, inner, calibrate)
