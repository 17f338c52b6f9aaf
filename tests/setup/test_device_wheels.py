"""The wheels carried to the GPU machine (the Makefile's DEVICE_WHEELS, bench/device_run.sh) are each pinned,
to exactly the lock's version: the machine has no network, so a mismatch would only show there."""
from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def device_wheels() -> list[Requirement]:
    text = (ROOT / "Makefile").read_text()
    block = re.search(r"^DEVICE_WHEELS := (.*?)(?<!\\)\n", text, re.S | re.M).group(1)
    return [Requirement(word) for word in block.replace("\\\n", " ").split()]


def lock() -> dict[str, str]:
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            out[canonicalize_name(req.name)] = str(req.specifier)
    return out


def test_every_device_wheel_is_pinned_to_the_lock():
    wheels, locked = device_wheels(), lock()
    assert len(wheels) >= 20
    for wheel in wheels:
        name = canonicalize_name(wheel.name)
        assert str(wheel.specifier).startswith("=="), f"{wheel} is not pinned"
        assert locked.get(name) == str(wheel.specifier), f"{wheel}: the lock has {name}{locked.get(name)}"
