"""The README and docs keep their promises: every command the README shows exists and takes
the options it is shown with, every relative link in README.md and docs/*.md reaches a file
(and a heading, where it names one), every Python example in the README compiles, imports
what it names from clues_fl and does what it says, and the scenarios' comments name the
package's real defaults."""

from __future__ import annotations

import importlib
import re
from types import SimpleNamespace
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from clues_fl.config import DEFAULTS

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))

# Linked from the README and written on another branch: remove a name here once it is merged.

FENCE = re.compile(r"^```([a-z]*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def code_blocks(path: Path, lang: str | None = None) -> list[str]:
    return [body for kind, body in FENCE.findall(path.read_text()) if lang is None or kind == lang]


COMMAND = re.compile(r"python -m clues_fl\.|python benchmarks/")


def commands(path: Path) -> list[str]:
    """The `python -m clues_fl...` and `python benchmarks/...` lines of the file's code blocks
    (continuation lines joined) and inline code spans."""
    text = path.read_text()
    out = []
    for block in code_blocks(path):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  # ")[0].strip()
            if COMMAND.search(line):
                out.append(line)
    inline = re.findall(r"`([^`\n]+)`", FENCE.sub("", text))
    return out + [span for span in inline if COMMAND.search(span)]


def target(command: str) -> list[str]:
    """The argv that runs the command's module or script, with its subcommand (without its arguments)."""
    module = re.search(r"python -m (clues_fl[\w.]*)", command)
    if module:
        return [sys.executable, "-m", module.group(1)]
    script = re.search(r"python (benchmarks/\S+\.py)(?: ([a-z][a-z0-9-]*)(?=\s|$))?", command)
    # a subcommand (`selection_draws.py measure --pool ...`): its own --help lists its options
    return [sys.executable, str(REPO / script.group(1)), *([script.group(2)] if script.group(2) else [])]


@cache
def help_text(argv: tuple[str, ...]) -> str:
    done = subprocess.run([*argv, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(argv)} --help: exit {done.returncode}\n{done.stderr[-2000:]}"
    return done.stdout


def test_the_readme_shows_commands():
    assert len(commands(README)) >= 5


@pytest.mark.parametrize("command", sorted(set(commands(README))))
def test_every_readme_command_exists_and_takes_its_options(command):
    shown = help_text(tuple(target(command)))
    for option in re.findall(r"(?<![\w'\"=-])(--[a-z][a-z0-9-]*)", command):
        assert re.search(re.escape(option) + r"(?![\w-])", shown), (
            f"{command}: {option} is not an option of {' '.join(target(command)[1:])}")


def docs_commands() -> list[tuple[str, str]]:
    return sorted({(path.name, command) for path in DOCS for command in commands(path)})


@pytest.mark.parametrize("doc,command", docs_commands())
def test_every_command_in_the_docs_answers_help_and_takes_its_options(doc, command):
    shown = help_text(tuple(target(command)))
    for option in re.findall(r"(?<![\w'\"=-])(--[a-z][a-z0-9-]*)", command):
        assert re.search(re.escape(option) + r"(?![\w-])", shown), (
            f"{doc}: {command}: {option} is not an option of {' '.join(target(command)[1:])}")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_every_relative_link_reaches_a_file_and_heading(path):
    text = FENCE.sub("", path.read_text())
    links = LINK.findall(text)
    for link in links:
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        file, _, anchor = link.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{path.name}: link to {link}: {dest} does not exist"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{path.name}: link to {link}: no heading '#{anchor}' in {dest.name}"


def test_the_readme_links_every_doc():
    linked = set(LINK.findall(README.read_text()))
    for doc in DOCS:
        assert f"docs/{doc.name}" in linked, f"README.md does not link docs/{doc.name}"


def test_every_python_example_compiles_and_its_clues_fl_names_exist():
    blocks = code_blocks(README, "python")
    assert len(blocks) >= 5
    for block in blocks:
        compile(block, "README.md", "exec")
        for module, names in re.findall(r"^from (clues_fl[\w.]*) import ([\w, ]+)$", block, re.M):
            imported = importlib.import_module(module)
            for name in names.split(","):
                assert hasattr(imported, name.strip()), f"README: {module} has no {name.strip()}"


def examples() -> dict[str, dict]:
    """The README's `# mypkg/...` examples, each run as its own module."""
    out = {}
    for block in code_blocks(README, "python"):
        first = block.splitlines()[0]
        if first.startswith("# mypkg/"):
            namespace: dict = {"__name__": first[2:].removesuffix(".py").replace("/", ".")}
            exec(compile(block, first[2:], "exec"), namespace)
            out[first[2:]] = namespace
    return out


def test_the_extension_examples_do_what_they_say():
    import torch
    from flwr.serverapp import ServerApp

    from clues_fl.scoring.scorers import Scorer
    from clues_fl.scoring.signals import Signal
    from clues_fl.selection.rules import ThresholdRule, ThresholdSettings, keep

    found = examples()
    assert set(found) == {"mypkg/scorers.py", "mypkg/signals.py", "mypkg/rules.py", "mypkg/merging.py",
                          "mypkg/server.py"}
    assert issubclass(found["mypkg/scorers.py"]["LengthScorer"], Scorer)
    length = found["mypkg/signals.py"]["answer_length"]
    assert isinstance(length, Signal) and length.direction == -1
    assert length.compute([SimpleNamespace(question="q", answer="abc")]) == [3]

    rule = found["mypkg/rules.py"]["AnchorMedian"]()
    assert isinstance(rule, ThresholdRule)
    decision = rule.decide(np.array([0.1, 0.3, 0.2]), np.array([0.0, 0.25, 0.5]), ThresholdSettings())
    assert decision == {"threshold": pytest.approx(0.2)}
    assert keep(np.array([0.0, 0.25, 0.5]), decision).tolist() == [False, True, True]

    sign_mean = found["mypkg/merging.py"]["sign_mean"]
    a, b = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(sign_mean([a, b], torch.tensor([0.5, 0.5])), torch.tensor([[2.0, 0.0]]))

    assert isinstance(found["mypkg/server.py"]["app"], ServerApp)


def test_scenario_comments_name_the_real_package_defaults():
    claims = 0
    for scenario in sorted((REPO / "scenarios").glob("*.toml")):
        tomllib.loads(scenario.read_text())  # every scenario parses
        for method, rule in re.findall(r"package default is (\S+) with (\S+?)\)?$", scenario.read_text(), re.M):
            assert (method, rule) == (DEFAULTS["selection.method"], DEFAULTS["selection.threshold"]), scenario.name
            claims += 1
        assert "also the defaults" not in scenario.read_text(), scenario.name
    assert claims >= 1
