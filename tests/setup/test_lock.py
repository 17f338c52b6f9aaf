"""The lock installs on a fresh machine: every pin is exact, carries no local version label (`+cpu` exists
only on the PyTorch index or a local wheel, never on the public index), and names a release that the index
has a file for, on every platform the README promises (Linux x86-64, glibc 2.35 or newer, CPython 3.11 and
3.12). The CPU or CUDA build of torch is chosen by the index at install time (README "Set-up"), not by the pin.

The resolution test asks the index pip is configured with (pip.conf, PIP_INDEX_URL, PIP_EXTRA_INDEX_URL: a
mirror works), through pip itself (`pip index versions` with the target Python and platforms, one index
page per package, in parallel): it needs that index reachable, which the CI machine has. No index address
is written here."""
from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ("requirements.in", "requirements.txt")
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
            f"{file}: {requirement} carries a local version label, which the public index never has; pin the "
            f"public version and choose the build with the index (README \"Set-up\")")


def test_the_lock_covers_every_top_level_pin():
    locked = {canonicalize_name(r.name): str(r.specifier) for r in pins("requirements.txt")}
    for requirement in pins("requirements.in"):
        assert locked.get(canonicalize_name(requirement.name)) == str(requirement.specifier), requirement


def available_versions(name: str, python: tuple[int, int]) -> set[Version]:
    """The versions of `name` that pip, with its own configuration, finds installable for `python` on the
    promised platforms (a matching wheel, or an sdist pip would build)."""
    command = [sys.executable, "-m", "pip", "index", "versions", name, "--pre", "--disable-pip-version-check",
               "--python-version", f"{python[0]}.{python[1]}"]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    for _ in range(3):  # a network error is asked again (twice); "nothing fits" is an answer
        run = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if run.returncode == 0 or "No matching distribution" in run.stderr:
            break
    if run.returncode != 0:
        return set()
    listed = next((line for line in run.stdout.splitlines() if line.startswith("Available versions:")), "")
    versions = set()
    for text in listed.partition(":")[2].split(","):
        try:
            versions.add(Version(text.strip()))
        except InvalidVersion:  # an old upload's non-standard name (e.g. "0.4.src"): never a pin of ours
            continue
    return versions


def test_every_pin_resolves_on_the_configured_index():
    requirements = pins("requirements.txt")
    wanted = [(r, p) for r in requirements for p in PYTHONS]
    with ThreadPoolExecutor(16) as pool:
        found = list(pool.map(lambda rp: available_versions(rp[0].name, rp[1]), wanted))
    missing = [f"{r} (Python {p[0]}.{p[1]})" for (r, p), versions in zip(wanted, found)
               if Version(next(iter(r.specifier)).version) not in versions]
    assert not missing, f"not installable from pip's configured index on Linux x86-64: {', '.join(missing)}"
