"""The registry of cache methods and the floors: one place lists every method with a typed, validated config whose
defaults are the hydra configs'; bac/ imports no other package of ours, backends/ never imports policies/."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bac.methods import CACHE_METHODS, REGISTRY, build_cache, defaults, make_config
from eval.peers import PEERS

ROOT = Path(__file__).resolve().parents[1]


def test_every_method_has_a_hydra_config_with_the_registry_defaults():
    files = {p.stem: OmegaConf.to_container(OmegaConf.load(p), resolve=True)
             for p in (ROOT / "configs" / "cache").glob("*.yaml") if p.stem not in PEERS}  # tests/test_peers.py
    assert set(files) == set(CACHE_METHODS) == set(REGISTRY)
    for name, yaml in files.items():
        given = defaults(name) if name != "none" else {k: v for k, v in defaults(name).items() if k in yaml}
        assert yaml == given, name  # none ignores the rows' knobs its yaml leaves out
        assert make_config(yaml)[0] == name


def test_unknown_names_and_knobs_are_named():
    with pytest.raises(ValueError, match=r"unknown cache 'nope'; known caches: \['none', 'uniform'"):
        make_config({"name": "nope"})
    with pytest.raises(ValueError, match=r"cache 'fora' has no knob \['intervall'\]; its knobs: \['interval', 'warmup'\]"):
        make_config({"name": "fora", "intervall": 3})


@pytest.mark.parametrize("cfg,message", [
    ({"name": "fora", "interval": 0}, r"cache.interval=0 must be an integer >= 1"),
    ({"name": "taylorseer", "order": 1.5}, r"cache.order=1.5 must be an integer >= 1"),
    ({"name": "delta_dit", "n_cached_layers": None}, "needs the knob cache.n_cached_layers"),
    ({"name": "profiling", "n_always": None}, "needs the knob cache.n_always"),
    ({"name": "toca", "ratio": 2}, r"cache.ratio=2 must be in \[0, 1\]"),
    ({"name": "bac", "metric": "l2"}, r"cache.metric='l2' is not one of \['cosine', 'l1', 'mse'\]"),
    ({"name": "fbcache", "threshold": None}, r"cache.threshold=None must be a number"),
    ({"name": "hyca", "pool": [{"name": "magic"}]}, "cache.pool needs forecasters named from"),
    ({"name": "bac_forecast", "forecaster": "magic"}, r"cache.forecaster='magic' is not one of"),
])
def test_configs_validate_their_knobs(cfg, message):
    with pytest.raises(ValueError, match=message):
        make_config(cfg)


def test_a_model_without_the_protocol_is_refused():
    with pytest.raises(TypeError, match="does not implement bac.protocol.CacheTarget"):
        build_cache(object(), {"name": "uniform"})


def _imports(folder: str) -> dict[str, set[str]]:
    out = {}
    for path in (ROOT / folder).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = names
    return out


def test_floors():
    ours = {"bac", "policies", "backends", "envs", "eval", "tests", "integrations"}
    for path, names in _imports("bac").items():
        assert not (names & ours) - {"bac"}, f"{path} imports {(names & ours) - {'bac'}}: bac/ is the ground floor"
    if (ROOT / "backends").exists():
        for path, names in _imports("backends").items():
            assert not names & {"policies", "envs", "eval"}, f"{path} imports {names & {'policies', 'envs', 'eval'}}"
    for folder in ("bac", "policies", "backends"):  # lerobot is an optional extra behind integrations/lerobot
        for path, names in _imports(folder).items():
            assert not names & {"lerobot", "integrations"}, f"{path} imports {names & {'lerobot', 'integrations'}}"
