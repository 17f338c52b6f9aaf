"""The lock installs on a fresh machine: every pin is exact, carries no local version label (`+cpu` exists
only on the PyTorch index or a local wheel, never on PyPI), and names a release PyPI has a file for, on every
platform the README promises (Linux x86-64, glibc 2.35 or newer, CPython 3.11 and 3.12). The CPU or CUDA
build of torch is chosen by the index at install time (README "Set-up"), not by the pin.

The second test asks PyPI itself (one Simple API page per package, in parallel): it needs the internet,
which the CI machine has. I2S_PACKAGE_INDEX points it at a mirror that speaks the JSON Simple API."""
from __future__ import annotations

import json
import os
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import (InvalidSdistFilename, InvalidWheelFilename, canonicalize_name, parse_sdist_filename,
                             parse_wheel_filename)
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ("requirements.in", "requirements.txt")
INDEX = os.environ.get("I2S_PACKAGE_INDEX", "https://pypi.org/simple")
PYTHONS = ((3, 11), (3, 12))
GLIBC = (2, 35)  # nvidia-pytriton's wheels are manylinux_2_35
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(GLIBC[1], 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]


def pins(file: str) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in (ROOT / file).read_text().splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


@pytest.mark.parametrize("file", LOCKS)
def test_every_pin_is_exact_and_public(file):
    found = pins(file)
    assert len(found) > 5
    for requirement in found:
        (spec,) = requirement.specifier  # exactly one
        assert spec.operator == "==", f"{file}: {requirement} is not pinned with =="
        assert Version(spec.version).local is None, (
            f"{file}: {requirement} carries a local version label, which PyPI never has; pin the public "
            f"version and choose the build with the index (README \"Set-up\")")


def test_the_lock_covers_every_top_level_pin():
    locked = {canonicalize_name(r.name): str(r.specifier) for r in pins("requirements.txt")}
    for requirement in pins("requirements.in"):
        assert locked.get(canonicalize_name(requirement.name)) == str(requirement.specifier), requirement


def _supported(python: tuple[int, int]) -> set[Tag]:
    return set(cpython_tags(python, platforms=PLATFORMS)) | set(compatible_tags(python, platforms=PLATFORMS))


def _files(name: str) -> list[dict]:
    request = urllib.request.Request(f"{INDEX}/{canonicalize_name(name)}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)["files"]


def _installable(requirement: Requirement, files: list[dict], python: tuple[int, int]) -> bool:
    """A wheel for this platform and Python, or an sdist (pip builds it), of the pinned version."""
    (spec,) = requirement.specifier
    wanted, supported = Version(spec.version), _supported(python)
    interpreter = Version(f"{python[0]}.{python[1]}.0")
    for file in files:
        name = file["filename"]
        if file.get("yanked") or spec.version not in name:
            continue
        try:
            if not SpecifierSet(file.get("requires-python") or "").contains(interpreter):
                continue
            if name.endswith(".whl"):
                _, version, _, tags = parse_wheel_filename(name)
                if version == wanted and tags & supported:
                    return True
            elif name.endswith(".tar.gz") and parse_sdist_filename(name)[1] == wanted:
                return True
        except (InvalidWheelFilename, InvalidSdistFilename, InvalidSpecifier):  # old uploads, not the pin's
            continue
    return False


def test_every_pin_resolves_on_the_public_index():
    requirements = pins("requirements.txt")
    with ThreadPoolExecutor(16) as pool:
        listings = dict(zip((r.name for r in requirements), pool.map(lambda r: _files(r.name), requirements)))
    missing = [f"{r} (Python {p[0]}.{p[1]})" for r in requirements for p in PYTHONS
               if not _installable(r, listings[r.name], p)]
    assert not missing, f"not installable from {INDEX} on Linux x86-64: {', '.join(missing)}"
