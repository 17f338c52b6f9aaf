"""The Kubernetes manifests: every overlay (and the optional components on top) renders, every object is valid
Kubernetes (strict schema), and what the manifests set is exactly what the services read: ports, health
service names, environment variables, model ids, targets. Expectations come from the code (config classes,
DEFAULT_PORT, serving.models, the generated stubs), never from a copy."""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import inspect
import json
import re
from pathlib import Path

import huggingface_hub.constants
import kubernetes_validate
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from serving import channels, metrics
from serving.models import DEFAULT_AUDIO_MODEL, DEFAULT_VLM_MODEL
from tests.deploy.manifests import (COMPONENTS, DEPLOY, K8S, OVERLAYS, RENDERINGS, SERVICES, container, env, objects,
                                    pod_specs, render)

K8S_VERSION = kubernetes_validate.latest_version()  # the newest schema the pinned package ships (1.37)
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}  # no schema ships for these; checked by hand below
# Variables for third-party code in the pods (huggingface_hub reads them), besides the services' own settings.
HUB_VARIABLES = {"HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN_PATH"}
MODEL_SERVICES = ("vlm", "audio")


def rendering_id(rendering) -> str:
    overlay, components = rendering
    return "+".join((overlay, *components))


each_rendering = pytest.mark.parametrize("rendering", RENDERINGS, ids=rendering_id)


def test_overlays_and_components_are_all_rendered():
    assert {"gpu", "cpu-dev"} <= set(OVERLAYS)
    in_overlays = {Path(c).name for o in OVERLAYS
                   for c in yaml.safe_load((K8S / "overlays" / o / "kustomization.yaml").read_text()).get("components", [])}
    assert {c for _, components in RENDERINGS for c in components} | in_overlays == set(COMPONENTS)


@each_rendering
def test_every_object_is_valid_kubernetes(rendering):
    docs = render(*rendering)
    errors, unchecked = [], []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unchecked.append((doc["apiVersion"], doc["kind"]))
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not errors, "\n".join(errors)
    assert set(unchecked) <= CRDS
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "HorizontalPodAutoscaler"} <= kinds
    assert set(objects(docs, "Deployment")) >= set(SERVICES)


@each_rendering
def test_everything_lands_in_the_overlays_namespace(rendering):
    docs = render(*rendering)
    (namespace,) = objects(docs, "Namespace")
    outside = [(d["kind"], d["metadata"]["name"]) for d in docs
               if d["kind"] != "Namespace" and d["metadata"].get("namespace") != namespace]
    assert not outside


def test_strict_validation_rejects_an_unknown_field():
    """The validator really checks, offline: a misspelt field in a rendered Deployment is refused."""
    deployment = copy.deepcopy(objects(render("gpu"), "Deployment")["vlm"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_service_monitor_scrapes_the_metrics_port_of_every_service():
    docs = render("gpu", ("service-monitor",))
    (monitor,) = objects(docs, "ServiceMonitor").values()
    selected = [s for s in objects(docs, "Service").values()
                if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert {s["metadata"]["name"] for s in selected} >= set(SERVICES)
    ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    for service in selected:
        assert ports <= {p["name"] for p in service["spec"]["ports"]}


# ---- environment: every variable a manifest sets is one the service (or huggingface_hub) reads ----

def _check_env_entries(entries: list[dict], owner: str, service=None) -> None:
    names = [e["name"] for e in entries]
    for i, entry in enumerate(entries):
        name, value = entry["name"], entry.get("value")
        for ref in re.findall(r"\$\((\w+)\)", value or ""):
            assert ref in names[:i], f"{owner}: {name} expands $({ref}), which is not set before it"
        if service is not None and name.startswith("I2S_"):
            setting = service.settings.get(name)
            assert setting is not None, f"{owner}: {service.package} does not read {name}"
            if value is not None:
                converted = setting.convert(value)
                if setting.choices:
                    assert converted in setting.choices, f"{owner}: {name}={value!r} is not one of {setting.choices}"
        elif name in HUB_VARIABLES:
            assert f'"{name}"' in inspect.getsource(huggingface_hub.constants), f"huggingface_hub ignores {name}"
        else:
            # Only for Kubernetes' $(VAR) expansion in the entries after it (the namespace, say).
            assert any(f"$({name})" in (e.get("value") or "") for e in entries[i + 1:]), \
                f"{owner}: nothing reads {name}"


@each_rendering
def test_every_environment_variable_is_read(rendering):
    docs = render(*rendering)
    for owner, spec in pod_specs(docs):
        for c in spec.get("initContainers", []) + spec["containers"]:
            service = SERVICES.get(c["name"]) if c in spec["containers"] else None
            _check_env_entries(c.get("env", []), f"{owner}/{c['name']}", service)


@each_rendering
def test_services_are_configured_only_through_checked_variables(rendering):
    """No command or flags on a service container: the image's entry point runs, and every setting is one
    of the variables checked above."""
    docs = render(*rendering)
    for name in SERVICES:
        c = container(docs, name)
        assert "command" not in c and "args" not in c, name


def _setting_env(service_name: str, *path: str) -> str:
    service = SERVICES[service_name]
    return next(name for name, s in service.settings.items() if s.path == path)


# ---- ports and health ----

@each_rendering
def test_ports_are_the_services_ports(rendering):
    docs = render(*rendering)
    for name, service in SERVICES.items():
        c = container(docs, name)
        values = env(c)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert int(values[_setting_env(name, "server", "port")]) == ports["grpc"] == service.port
        metrics_port = int(values[_setting_env(name, "server", "metrics_port")])
        assert ports["metrics"] == metrics_port
        assert values[_setting_env(name, "server", "host")] == "0.0.0.0"  # reachable from outside the pod
        pod = objects(docs, "Deployment")[name]["spec"]["template"]
        assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == metrics_port
        svc = objects(docs, "Service")[name]
        assert svc["spec"]["clusterIP"] == "None"  # headless: DNS gives every ready pod, round_robin spreads
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        by_name = {p["name"]: p for p in svc["spec"]["ports"]}
        assert by_name["grpc"]["port"] == service.port and by_name["grpc"]["targetPort"] == "grpc"
        assert by_name["metrics"]["port"] == metrics_port


def _probe_asks(probe: dict, service) -> str | None:
    """The health service name a probe checks on `service`'s port, or None for a TCP probe."""
    if "tcpSocket" in probe:
        return None
    if "grpc" in probe:
        assert probe["grpc"]["port"] == service.port
        return probe["grpc"].get("service", "")
    command = probe["exec"]["command"]
    assert command[:3] == ["python", "/opt/i2s/healthcheck.py", service.package], command
    return command[command.index("--service") + 1] if "--service" in command else ""


@each_rendering
def test_probes_ask_for_the_health_the_servers_report(rendering):
    docs = render(*rendering)
    for name in MODEL_SERVICES:
        c, service = container(docs, name), SERVICES[name]
        # "" is the whole server: SERVING once the model is loaded and warm.
        assert _probe_asks(c["startupProbe"], service) == ""
        assert _probe_asks(c["livenessProbe"], service) == ""
        assert _probe_asks(c["readinessProbe"], service) == service.health_name
        # first start: download + load + compile + warm-up take minutes
        assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 15 * 60
    c, service = container(docs, "orchestrator"), SERVICES["orchestrator"]
    # Ready only while both model services are; but alive whenever it listens, or an outage of a model
    # service would restart every orchestrator.
    assert _probe_asks(c["readinessProbe"], service) == service.health_name
    assert _probe_asks(c["startupProbe"], service) is None and _probe_asks(c["livenessProbe"], service) is None


@each_rendering
def test_orchestrator_dials_the_headless_model_services_round_robin(rendering):
    docs = render(*rendering)
    values = env(container(docs, "orchestrator"))
    for name, path in (("vlm", "vlm_target"), ("audio", "audio_target")):
        service = objects(docs, "Service")[name]
        assert service["spec"]["clusterIP"] == "None"
        expected = f"dns:///{name}.$(POD_NAMESPACE).svc.cluster.local:{SERVICES[name].port}"
        assert values[_setting_env("orchestrator", path)] == expected
    namespace = next(e for e in container(docs, "orchestrator")["env"] if e["name"] == "POD_NAMESPACE")
    assert namespace["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    # the channels' own service config is what spreads the calls
    policies = json.loads(channels.SERVICE_CONFIG)["loadBalancingConfig"]
    assert "round_robin" in policies[0]


# ---- models ----

@pytest.mark.parametrize("overlay", ["gpu", "gpu-triton"])
def test_gpu_models_are_the_default_checkpoints_and_prefetched(overlay):
    docs = render(overlay)
    defaults = {"vlm": DEFAULT_VLM_MODEL, "audio": DEFAULT_AUDIO_MODEL}
    for name, model in defaults.items():
        config_default = SERVICES[name].config_class().model
        assert config_default == model
        assert env(container(docs, name))[_setting_env(name, "model")] == model
        spec = objects(docs, "Deployment")[name]["spec"]["template"]["spec"]
        (wait,) = spec["initContainers"]
        assert wait["args"] == [model]
        assert env(container(docs, name))["HF_HUB_OFFLINE"] == "1"
    job = objects(docs, "Job")["model-prefetch"]["spec"]["template"]["spec"]
    downloads = job["initContainers"] + job["containers"]
    assert sorted(a for c in downloads for a in c["args"]) == sorted(defaults.values())
    # the Job writes the cache the model pods read
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in job["volumes"] if "persistentVolumeClaim" in v}
    for name in defaults:
        spec = objects(docs, "Deployment")[name]["spec"]["template"]["spec"]
        models = next(v for v in spec["volumes"] if v["name"] == "models")
        assert models["persistentVolumeClaim"]["claimName"] in claims.values()
        assert "emptyDir" not in models


def test_cpu_dev_builds_tiny_models_where_the_services_load_them():
    docs = render("cpu-dev")
    for name in MODEL_SERVICES:
        spec = objects(docs, "Deployment")[name]["spec"]["template"]["spec"]
        (init,) = spec["initContainers"]
        python, flag, module, out = init["command"]
        assert (python, flag) == ("python", "-m")
        assert importlib.util.find_spec(module) is not None and hasattr(importlib.import_module(module), "main")
        assert env(container(docs, name))[_setting_env(name, "model")] == out
        assert env(container(docs, name))[_setting_env(name, "device")] == "cpu"
        mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
        main_mounts = {m["mountPath"]: m["name"] for m in container(docs, name)["volumeMounts"]}
        root = next(p for p in mounts if out.startswith(p + "/"))
        assert main_mounts[root] == mounts[root]


# ---- placement, hardening, disruption, scaling, network ----

def _gpus(c: dict) -> int:
    return int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_gpu_per_model_pod_only_where_the_model_runs(overlay):
    docs = render(overlay)
    deployments = objects(docs, "Deployment")
    gpus = {name: sum(_gpus(c) for c in d["spec"]["template"]["spec"]["containers"]) for name, d in deployments.items()}
    expected = {"gpu": {"vlm": 1, "audio": 1}, "cpu-dev": {}, "gpu-triton": {"triton": 1}}[overlay]
    assert {n: g for n, g in gpus.items() if g} == expected
    for name in expected:
        spec = deployments[name]["spec"]["template"]["spec"]
        assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])


@each_rendering
def test_every_pod_is_hardened(rendering):
    for owner, spec in pod_specs(render(*rendering)):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0, owner
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", owner
        assert spec["automountServiceAccountToken"] is False, owner
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (owner, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (owner, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (owner, c["name"])
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), (owner, c["name"])
            # the root filesystem is read-only: caches (HOME, XDG_CACHE_HOME=/tmp/cache) need a volume
            if c in spec["containers"] and not owner.startswith("Job/"):
                assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, (owner, c["name"])


@each_rendering
def test_every_deployment_has_a_disruption_budget(rendering):
    docs = render(*rendering)
    budgets = objects(docs, "PodDisruptionBudget").values()
    for name, deployment in objects(docs, "Deployment").items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert any(b["spec"]["selector"]["matchLabels"].items() <= labels.items() for b in budgets), name


def _metric_names() -> set[str]:
    return {m._name for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)}


def test_autoscalers_scale_on_metrics_the_services_export():
    docs = render("gpu", ("model-autoscaling",))
    autoscalers = objects(docs, "HorizontalPodAutoscaler")
    assert autoscalers["orchestrator"]["spec"]["scaleTargetRef"]["name"] == "orchestrator"
    for name in MODEL_SERVICES:
        spec = autoscalers[name]["spec"]
        assert spec["scaleTargetRef"]["name"] == name
        (metric,) = spec["metrics"]
        assert metric["pods"]["metric"]["name"] in _metric_names()
    # the audio target is one full batch per pod, at the batch size the service uses on a GPU
    from audio_service.config import effective_max_batch_size

    audio_target = autoscalers["audio"]["spec"]["metrics"][0]["pods"]["target"]["averageValue"]
    gpu_config = dataclasses.replace(SERVICES["audio"].config_class(), device="cuda")
    assert int(audio_target) == effective_max_batch_size(gpu_config)


def test_metric_names_in_the_deploy_readme_exist():
    exposed = set()
    for name in _metric_names():
        exposed |= {name, f"{name}_total", f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    named = set(re.findall(r"\bi2s_[a-z_]+\b", (DEPLOY / "README.md").read_text()))
    assert named and named <= exposed, named - exposed


def _selects(policy: dict, labels: dict) -> bool:
    return policy["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()


def _allows_port(rule: dict, port_name: str, port: int) -> bool:
    return "ports" not in rule or any(p.get("port") in (port_name, port) for p in rule["ports"])


@each_rendering
def test_only_the_orchestrator_reaches_the_model_services(rendering):
    docs = render(*rendering)
    deployments = objects(docs, "Deployment")
    orchestrator = deployments["orchestrator"]["spec"]["template"]["metadata"]["labels"]
    policies = objects(docs, "NetworkPolicy").values()
    for name in MODEL_SERVICES:
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        selecting = [p for p in policies if _selects(p, labels) and "Ingress" in p["spec"]["policyTypes"]]
        assert selecting, f"{name} is not isolated"
        for policy in selecting:
            for rule in policy["spec"].get("ingress", []):
                if _allows_port(rule, "grpc", SERVICES[name].port):
                    assert rule.get("from"), f"{policy['metadata']['name']}: grpc open to all"
                    for peer in rule["from"]:
                        assert set(peer) == {"podSelector"}, peer
                        assert peer["podSelector"]["matchLabels"].items() <= orchestrator.items()


# ---- TLS and tokens ----

@pytest.mark.parametrize("rendering", [r for r in RENDERINGS if "tls" in r[1]], ids=rendering_id)
def test_tls_and_token_files_come_from_mounted_secrets(rendering):
    docs = render(*rendering)
    for name, service in SERVICES.items():
        spec = objects(docs, "Deployment")[name]["spec"]["template"]["spec"]
        secret_volumes = {v["name"] for v in spec["volumes"] if "secret" in v}
        c = container(docs, name)
        secret_dirs = [m["mountPath"] for m in c["volumeMounts"] if m["name"] in secret_volumes]
        files = {k: v for k, v in env(c).items() if k.endswith("_FILE") and ("TLS" in k or "TOKEN" in k)}
        assert any("TLS_CERT_FILE" in k for k in files) and any("TOKEN" in k for k in files)
        for variable, path in files.items():
            assert any(path.startswith(d + "/") for d in secret_dirs), (name, variable, path)
        # the probes must speak TLS now: the image's health check, not kubelet's plaintext gRPC probe
        assert "exec" in c["readinessProbe"]
