"""No package registry address anywhere in the tracked tree: users install behind mirrors, so packages come from
the index pip is configured with (tests/setup/test_lock.py asks that one) and the torch build from an index the
user passes (TORCH_INDEX, TORCH_CPU_INDEX, TORCH_CUDA_INDEX; README "Set-up", deploy/README.md)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Hosts of public package indexes and their file servers, and an index address written into a pip option.
REGISTRY = re.compile(
    r"pypi\.org|pypi\.python\.org|pythonhosted\.org|download\.pytorch\.org|pypi\.nvidia\.com|pypi\.ngc\.nvidia\.com"
    r"|anaconda\.org|repo\.anaconda\.com|conda\.anaconda\.org"
    r"|(index-url|find-links|extra-index-url)[ =]+['\"]?(https?|file)://",
    re.IGNORECASE)


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout.split(b"\0")
    return [ROOT / name.decode() for name in names if name]


def registry_addresses(paths: list[Path], root: Path = ROOT) -> list[str]:
    """"path:line: text" of every line that names a registry."""
    found = []
    for path in paths:
        if path == Path(__file__).resolve() or not path.is_file():  # this file spells the patterns
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # images, wheels: not text
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if REGISTRY.search(line):
                found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return found


def test_no_tracked_file_names_a_package_registry():
    files = tracked_text_files()
    assert len(files) > 100
    found = registry_addresses(files)
    assert not found, "package registry addresses in the repository:\n" + "\n".join(found)


def test_the_check_finds_an_address_written_anywhere(tmp_path):
    for i, line in enumerate(["pip install --index-url https://mirror.example/simple torch",
                              "RUN pip install --extra-index-url=https://example.org/whl/cu128 torch",
                              "# files come from files.PythonHosted.org", "see https://pypi.org/project/torch/"]):
        (tmp_path / f"{i}.txt").write_text(f"first line\n{line}\n")
    (tmp_path / "clean.txt").write_text("pip install -r requirements.txt  # pip's configured index\n")
    found = registry_addresses(sorted(tmp_path.iterdir()), tmp_path)
    assert [entry.split(":")[1] for entry in found] == ["2"] * 4
