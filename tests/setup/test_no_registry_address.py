"""No package registry address anywhere in the tracked tree: users install behind mirrors, so packages come from
the index pip is configured with (tests/setup/test_lock.py asks that one) and the torch build from an index the
user passes (TORCH_INDEX, TORCH_CPU_INDEX, TORCH_CUDA_INDEX; README "Set-up", deploy/README.md)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Hosts of public package indexes and their file servers, and an index address written into a pip option. Written
# as patterns only, so this file names no address itself (its test builds the addresses it probes with).
REGISTRY_HOSTS = (r"pypi\.org", r"pypi\.python\.org", r"pythonhosted\.org", r"download\.pytorch\.org",
                  r"pypi\.nvidia\.com", r"pypi\.ngc\.nvidia\.com", r"anaconda\.org", r"repo\.anaconda\.com",
                  r"conda\.anaconda\.org")
PIP_OPTION_ADDRESS = r"(index-url|find-links|extra-index-url)[ =]+['\"]?(https?|file)://"
REGISTRY = re.compile("|".join([*REGISTRY_HOSTS, PIP_OPTION_ADDRESS]), re.IGNORECASE)


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout.split(b"\0")
    return [ROOT / name.decode() for name in names if name]


def registry_addresses(paths: list[Path], root: Path = ROOT) -> list[str]:
    """"path:line: text" of every line that names a registry."""
    found = []
    for path in paths:
        if not path.is_file():
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
    scheme = "https"  # joined at run time: the probes' addresses are not in this file
    probes = [f"pip install --index-url {scheme}://mirror.invalid/simple torch",
              f"RUN pip install --extra-index-url={scheme}://mirror.invalid/whl/cu128 torch"]
    probes += [f"# files come from {host.replace(chr(92), '').upper()}" for host in REGISTRY_HOSTS]
    for i, line in enumerate(probes):
        (tmp_path / f"{i:02}.txt").write_text(f"first line\n{line}\n")
    (tmp_path / "clean.txt").write_text("pip install -r requirements.txt  # pip's configured index\n")
    found = registry_addresses(sorted(tmp_path.iterdir()), tmp_path)
    assert [entry.split(":")[1] for entry in found] == ["2"] * len(probes)
