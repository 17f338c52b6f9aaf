"""The import contracts of pyproject.toml ([tool.importlinter], docs/architecture.md "Packages"): no service
imports another, serving and i2s_formats import no service, the client and the command line import no
service internals, and no service imports them; serving's layers; no import circle inside any package; the
benchmark and the test checkpoints' builders stay out of the product. deploy/ is no package (Triton loads
`deploy/triton/<model>/1/model.py` by path): its Python files are checked as a probe package here. Run by
import-linter's own command, as a developer would."""
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


UNINSTALLED = ("bench", "tiny_models")  # checked by the contracts but not installed packages


def lint(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    # lint-imports puts its working directory on the import path: that is how the probes below are found. A
    # probe's folder also gets links to the packages that are found only from the repository root.
    if cwd != ROOT:
        for name in UNINSTALLED:
            if not (cwd / name).exists():
                (cwd / name).symlink_to(ROOT / name, target_is_directory=True)
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


def test_the_modules_deprecated_in_0_3_and_0_4_are_gone_in_0_5():
    """README "Changed in 0.5": each old name was kept one release with a DeprecationWarning, then removed."""
    code = ("import importlib\n"
            "for name in ('orchestrator.client', 'i2s_formats.requests'):\n"
            "    try:\n        importlib.import_module(name)\n    except ModuleNotFoundError as e:\n"
            "        print('gone:', e.name)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["gone: orchestrator.client", "gone: i2s_formats.requests"]


def test_a_circle_hidden_by_an_import_inside_a_function_breaks_the_contract(tmp_path):
    """How serving.request_log and serving.tracing once stood: each imports the other, one inside a function."""
    probe = tmp_path / "circle_probe"
    probe.mkdir()
    (probe / "__init__.py").write_text("")
    (probe / "log.py").write_text("from circle_probe import trace\n")
    (probe / "trace.py").write_text("def request_id():\n    from circle_probe import log\n    return log\n")
    settings = json.loads(json.dumps(CONTRACTS))
    settings["root_packages"].append("circle_probe")
    acyclic = next(c for c in settings["contracts"] if c["type"] == "acyclic_siblings")
    acyclic["ancestors"].append("circle_probe")

    run = lint(_write_toml(settings, tmp_path / "contracts.toml"), tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"Contracts: {len(settings['contracts']) - 1} kept, 1 broken." in run.stdout
    assert "No cycles are allowed in circle_probe" in run.stdout


# deploy/'s Python files, as modules of a probe package: the Triton models build the project's backends from
# their modules and the services' config, never from a server module, and nothing of the client side.
DEPLOY_FILES = {"triton_vlm_model": "deploy/triton/vlm/1/model.py", "triton_audio_model": "deploy/triton/audio/1/model.py",
                "docker_healthcheck": "deploy/docker/healthcheck.py",
                "docker_model_requirements": "deploy/docker/model-requirements.py"}
DEPLOY_CONTRACT = {
    "name": "deploy/ (the Triton models, the images' scripts) imports no server module, no client side, no tools",
    "type": "forbidden",
    "source_modules": ["deploy_probe"],
    "forbidden_modules": ["vlm_service.server", "audio_service.server", "orchestrator", "gateway", "i2s_client",
                          "i2s_cli", "bench", "tiny_models"],
}


def _lint_deploy(tmp_path: Path, extra: str = "") -> subprocess.CompletedProcess:
    probe = tmp_path / "deploy_probe"
    probe.mkdir()
    (probe / "__init__.py").write_text("")
    assert {path for path in DEPLOY_FILES.values()} == {
        str(p.relative_to(ROOT)) for p in (ROOT / "deploy").rglob("*.py") if "__pycache__" not in p.parts}
    for name, path in DEPLOY_FILES.items():
        shutil.copy(ROOT / path, probe / f"{name}.py")
    if extra:
        (probe / "extra.py").write_text(extra)
    settings = json.loads(json.dumps(CONTRACTS))
    settings["root_packages"].append("deploy_probe")
    settings["contracts"] = [DEPLOY_CONTRACT]
    # The project's packages are found where they are, on the import path; the probe in the working directory.
    return lint(_write_toml(settings, tmp_path / "contracts.toml"), tmp_path)


def test_deploy_keeps_its_import_contract(tmp_path):
    run = _lint_deploy(tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Contracts: 1 kept, 0 broken." in run.stdout


def test_a_triton_model_that_imports_a_server_module_breaks_deploys_contract(tmp_path):
    run = _lint_deploy(tmp_path, "from vlm_service.server import build_backend\n")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "deploy_probe.extra -> vlm_service.server" in run.stdout
