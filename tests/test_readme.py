"""Every command in the code blocks of the README and docs/*.md parses as printed: hydra entry points compose their
config with the command's overrides (unknown keys, groups and values fail), argparse entry points parse their
arguments (unknown flags and subcommands fail), and the docs/ paths they name exist. Nothing is run past the
parsing."""
from __future__ import annotations

import argparse
import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest

from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[1]


def readme_commands(path: Path = ROOT / "README.md") -> list[str]:
    """The ``python eval/...`` lines of a markdown file's fenced code blocks (continuation lines joined)."""
    text = path.read_text()
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("python eval/"):
                out.append(line)
    return out


COMMANDS = readme_commands()
DOC_COMMANDS = [c for doc in sorted((ROOT / "docs").glob("*.md")) for c in readme_commands(doc)]


def test_readme_has_the_main_commands():
    assert len(COMMANDS) >= 30
    assert any(c.startswith("python eval/run.py env=robomimic") for c in COMMANDS)
    assert any(c.startswith("python eval/frontier.py") for c in COMMANDS)


def hydra_overrides(args: list[str]) -> list[str]:
    """A command's overrides as one composition: ``-m`` dropped, a sweep ``k=a,b`` reduced to its first value."""
    out = []
    for a in args:
        if a in ("-m", "--multirun"):
            continue
        key, _, value = a.partition("=")
        if "," in value and not value.startswith(("[", "{")) and not key.startswith("hydra"):
            value = value.split(",")[0]
        out.append(f"{key}={value}")
    return out


class Parsed(Exception):
    pass


@pytest.mark.parametrize("command", COMMANDS + DOC_COMMANDS)
def test_readme_command_parses(command, monkeypatch):
    argv = shlex.split(command)[1:]
    script = ROOT / argv[0]
    assert script.exists(), f"{argv[0]} does not exist"
    for arg in argv[1:]:  # inputs and outputs under docs/ (results/ and data/ are the user's)
        path = arg.partition("=")[2] if "=" in arg else arg
        if path.startswith("docs/") and "<" not in path:
            assert (ROOT / path).exists(), f"{command!r} names {path}, which does not exist"
    source = script.read_text()
    if "@hydra.main" in source:
        config = re.search(r'config_name="(\w+)"', source).group(1)
        compose_cfg(*hydra_overrides(argv[1:]), config_name=config)  # raises on an unknown key, group or value
        return
    real_parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        real_parse(self, args, namespace)  # SystemExit(2) on an unknown flag or subcommand
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", argv)
    module = importlib.import_module(argv[0].removesuffix(".py").replace("/", "."))
    with pytest.raises(Parsed):
        if argv[0] == "eval/train.py":
            module.train(module.parse_args())
        else:
            module.main(argv[1:])


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file: lower case, punctuation dropped, spaces as dashes."""
    heads = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("doc", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_resolve(doc):
    path = ROOT / doc
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold no links
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{doc} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{doc} links to {target}: no such heading in {file or doc}"
