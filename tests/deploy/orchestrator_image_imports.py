"""Runs the orchestrator (`python -m tests.deploy.orchestrator_image_imports <orchestrator flags>`) able to
import only what the orchestrator image installs: the standard library, the project, and the distributions of
deploy/docker/orchestrator-requirements.txt with their own dependencies. Any other import (torch, transformers,
diffusers...) raises ImportError, as it would in that image."""
from __future__ import annotations

import importlib.abc
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REQUIREMENTS = Path(__file__).resolve().parents[2] / "deploy" / "docker" / "orchestrator-requirements.txt"
ROOT = REQUIREMENTS.parents[2]
# The project's own top-level packages (the wheel's, from pyproject.toml) and the tests.
PROJECT = {name.partition(".")[0] for name in
           tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]} | {"tests"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_distributions() -> set[str]:
    """The listed distributions and, transitively, what they require (extras and markers evaluated)."""
    pending = [line.strip() for line in REQUIREMENTS.read_text().splitlines() if line.strip() and not line.startswith("#")]
    found: set[str] = set()
    while pending:
        name = normalise(pending.pop())
        if name in found:
            continue
        found.add(name)
        for text in md.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return found


class ImageOnly(importlib.abc.MetaPathFinder):
    def __init__(self, allowed: set[str]):
        self.allowed = allowed
        self.owners = {module: {normalise(d) for d in dists} for module, dists in md.packages_distributions().items()}

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top in sys.stdlib_module_names or top in PROJECT or top.startswith("_"):
            return None
        owners = self.owners.get(top, set())
        if not owners & self.allowed:
            raise ImportError(f"{top} ({', '.join(sorted(owners)) or 'unknown'}) is not in the orchestrator image")
        return None


def main() -> None:
    sys.meta_path.insert(0, ImageOnly(image_distributions()))
    from orchestrator.__main__ import main as orchestrator_main

    orchestrator_main(sys.argv[1:])


if __name__ == "__main__":
    main()
