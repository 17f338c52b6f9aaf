"""The import contracts of pyproject.toml ([tool.importlinter], docs/architecture.md "Packages"): no service
imports another, serving and i2s_formats import no service, the client and the command line import no
service internals, and no service imports them. Run by import-linter's own command, as a developer would."""
import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def lint(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    # lint-imports puts its working directory on the import path: that is how the probe below is found.
    return subprocess.run([str(LINT_IMPORTS), "--config", str(config), "--no-cache", "--no-logo"], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_the_project_keeps_every_import_contract():
    run = lint(ROOT / "pyproject.toml", ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"Contracts: {len(CONTRACTS['contracts'])} kept, 0 broken." in run.stdout


def _write_toml(settings: dict, path: Path) -> Path:
    """Enough TOML for these settings (strings and lists of strings): JSON's literals are TOML's too."""
    lines = ["[tool.importlinter]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items() if key != "contracts"]
    for contract in settings["contracts"]:
        lines += ["", "[[tool.importlinter.contracts]]"]
        lines += [f"{key} = {json.dumps(value)}" for key, value in contract.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_client_module_that_imports_the_orchestrator_breaks_the_contract(tmp_path):
    """The same contracts, with one more module on the client side that imports a service's internals."""
    probe = tmp_path / "i2s_client_probe"
    probe.mkdir()
    (probe / "__init__.py").write_text("from orchestrator import pipeline  # what a client must not do\n")
    settings = json.loads(json.dumps(CONTRACTS))
    settings["root_packages"].append("i2s_client_probe")
    client_contract = next(c for c in settings["contracts"] if c["name"].startswith("the client and the command"))
    client_contract["source_modules"].append("i2s_client_probe")

    run = lint(_write_toml(settings, tmp_path / "contracts.toml"), tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"Contracts: {len(settings['contracts']) - 1} kept, 1 broken." in run.stdout
    assert "i2s_client_probe -> orchestrator.pipeline" in run.stdout


def test_the_0_2_client_import_still_works_for_one_release_with_a_deprecation_warning():
    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            "try:\n    import orchestrator.client\nexcept DeprecationWarning as w:\n    print('warned:', w)\n"
            "warnings.simplefilter('ignore')\nimport sys; sys.modules.pop('orchestrator.client', None)\n"
            "import i2s_client, orchestrator.client as old\n"
            "print(old.ImageToSoundClient is i2s_client.ImageToSoundClient, old.collect is i2s_client.collect)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "warned: orchestrator.client is deprecated: import from i2s_client instead (it goes in 0.4)", "True True"]
