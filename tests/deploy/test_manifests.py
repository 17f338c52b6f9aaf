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
# No schema ships for these custom resources: checked by hand below.
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule"),
        ("keda.sh/v1alpha1", "ScaledObject"), ("gateway.networking.k8s.io/v1", "Gateway"),
        ("gateway.networking.k8s.io/v1", "GRPCRoute")}
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
        elif name.startswith("I2S_TRITON_"):
            assert any(f'"{name}"' in f.read_text() for f in (DEPLOY / "triton").glob("*/1/model.py")), \
                f"{owner}: no Triton model reads {name}"
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
        if overlay == "gpu":  # in gpu-triton the model pods are CPU fronts; Triton waits (see below)
            (wait,) = spec["initContainers"]
            assert wait["args"][0] == model
        assert env(container(docs, name))["HF_HUB_OFFLINE"] == "1"
    job = objects(docs, "Job")["model-prefetch"]["spec"]["template"]["spec"]
    downloads = job["initContainers"] + job["containers"]
    assert sorted(c["args"][0] for c in downloads) == sorted(defaults.values())
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
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        # GPU Feature Discovery's labels are optional (components/gpu-node-labels): the GPU request places it.
        assert not spec.get("nodeSelector"), name


def test_gpu_node_labels_pin_gpu_feature_discovery_and_enough_memory():
    docs = render("gpu", ("gpu-node-labels",))
    for name in MODEL_SERVICES:
        spec = objects(docs, "Deployment")[name]["spec"]["template"]["spec"]
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        (term,) = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        (memory,) = [e for e in term["matchExpressions"] if e["key"] == "nvidia.com/gpu.memory"]
        assert memory["operator"] == "Gt"
        if name == "vlm":  # Qwen2.5-VL-7B in bf16: ~17 GB of weights, plus the KV cache: a 24 GB class at least
            assert int(memory["values"][0]) >= 20_000


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
    wrapped = {m._name for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)}
    return wrapped | {family.name for family in metrics.GPU_MEMORY.collect()}  # read at scrape time


def _queues() -> dict[str, str]:
    """The i2s_queue_depth label of each model service's waiting work."""
    return {"vlm": importlib.import_module("vlm_service.server").QUEUE,
            "audio": importlib.import_module("audio_service.server").QUEUE}


def _batch_sizes() -> dict[str, int]:
    """Requests a model pod runs at once on a GPU: the VLM's decode engine batch, the audio batch."""
    from audio_service.config import effective_max_batch_size

    vlm = SERVICES["vlm"].config_class()
    assert vlm.engine  # the engine batches; the reference path (engine off) would run one at a time
    audio = dataclasses.replace(SERVICES["audio"].config_class(), device="cuda")
    return {"vlm": vlm.engine_max_batch, "audio": effective_max_batch_size(audio)}


def test_autoscalers_scale_on_metrics_the_services_export():
    docs = render("gpu", ("model-autoscaling",))
    autoscalers = objects(docs, "HorizontalPodAutoscaler")
    assert autoscalers["orchestrator"]["spec"]["scaleTargetRef"]["name"] == "orchestrator"
    for name in MODEL_SERVICES:
        spec = autoscalers[name]["spec"]
        assert spec["scaleTargetRef"]["name"] == name
        (metric,) = spec["metrics"]
        # waiting work (not calls in flight: deploy/README.md "Scaling"), the service's own queue
        assert metric["pods"]["metric"]["name"] == "i2s_queue_depth" in _metric_names()
        assert metric["pods"]["metric"]["selector"] == {"matchLabels": {"queue": _queues()[name]}}
        # one full batch waiting per pod: the next batch is already full
        assert int(metric["pods"]["target"]["averageValue"]) == _batch_sizes()[name], name


@pytest.mark.parametrize("overlay", ["gpu", "cpu-dev"])
def test_keda_scales_on_each_services_queue_in_its_namespace(overlay):
    docs = render(overlay, ("keda-autoscaling",))
    (namespace,) = objects(docs, "Namespace")
    scaled = objects(docs, "ScaledObject")
    for name in MODEL_SERVICES:
        spec = scaled[name]["spec"]
        assert spec["scaleTargetRef"]["name"] == name and name in objects(docs, "Deployment")
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus"
        query = trigger["metadata"]["query"]
        assert f'namespace="{namespace}"' in query and f'service="{name}"' in query
        assert set(re.findall(r"\bi2s_[a-z_]+", query)) == {"i2s_queue_depth"} <= _metric_names()
        assert f'queue="{_queues()[name]}"' in query  # the service's own waiting work, not another queue's
        assert int(trigger["metadata"]["threshold"]) == _batch_sizes()[name]
    assert not objects(docs, "HorizontalPodAutoscaler").keys() & set(MODEL_SERVICES)  # KEDA makes its own


@each_rendering
def test_replicas_are_left_to_the_autoscalers(rendering):
    docs = render(*rendering)
    owned = {h["spec"]["scaleTargetRef"]["name"] for h in objects(docs, "HorizontalPodAutoscaler").values()}
    owned |= {s["spec"]["scaleTargetRef"]["name"] for s in objects(docs, "ScaledObject").values()}
    assert "orchestrator" in owned
    for name, deployment in objects(docs, "Deployment").items():
        assert ("replicas" in deployment["spec"]) == (name not in owned), name


def test_metric_names_in_the_deploy_readme_exist():
    exposed = set()
    for name in _metric_names():
        exposed |= {name, f"{name}_total", f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    packages = {p.name for p in DEPLOY.parent.iterdir() if (p / "__init__.py").exists()}  # i2s_client is no metric
    named = set(re.findall(r"\bi2s_[a-z_]+\b", (DEPLOY / "README.md").read_text())) - packages
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


# ---- rollouts and drains ----

def _setting_value(docs, name: str, *path: str):
    """What a service runs with: the manifest's variable, else the setting's default."""
    variable = _setting_env(name, *path)
    setting = SERVICES[name].settings[variable]
    value = env(container(docs, name)).get(variable)
    return setting.convert(value) if value is not None else setting.default


@each_rendering
def test_rollouts_wait_out_a_cold_start(rendering):
    docs = render(*rendering)
    for name, deployment in objects(docs, "Deployment").items():
        spec = deployment["spec"]
        c = spec["template"]["spec"]["containers"][0]
        startup = c["startupProbe"]
        allowed = startup["periodSeconds"] * startup["failureThreshold"]
        # the startup probe's window plus 15 minutes for the image pull and the weights
        assert spec["progressDeadlineSeconds"] >= allowed + 15 * 60 if allowed >= 15 * 60 else \
            spec["progressDeadlineSeconds"] >= 300, name


@each_rendering
def test_termination_grace_covers_the_drain(rendering):
    docs = render(*rendering)
    for name in SERVICES:
        pod = objects(docs, "Deployment")[name]["spec"]["template"]["spec"]
        pre_stop = container(docs, name)["lifecycle"]["preStop"]["sleep"]["seconds"]
        drain = (pre_stop + _setting_value(docs, name, "server", "drain_notice_seconds")
                 + _setting_value(docs, name, "server", "grace_seconds"))
        assert pod["terminationGracePeriodSeconds"] >= drain + 5, (name, drain)


@each_rendering
def test_connections_age_so_new_replicas_get_calls(rendering):
    docs = render(*rendering)
    deadline = _setting_value(docs, "orchestrator", "default_deadline_seconds")
    for name in SERVICES:
        age = _setting_value(docs, name, "server", "max_connection_age_seconds")
        grace = _setting_value(docs, name, "server", "max_connection_age_grace_seconds")
        # a replica added by a scale-up gets calls from connected clients within `age` (they reconnect and
        # re-resolve); a scale-up takes minutes anyway, so at most 10 minutes
        assert 0 < age <= 600, name
        if name in MODEL_SERVICES:  # a model call on an aged connection may run to the orchestrator's deadline
            assert grace >= deadline, name


@pytest.mark.parametrize("overlay", ["gpu", "gpu-triton"])
def test_gpu_pods_are_kept_out_of_consolidation(overlay):
    docs = render(overlay)
    gpu_pods = [d["spec"]["template"] for d in objects(docs, "Deployment").values()
                if any(_gpus(c) for c in d["spec"]["template"]["spec"]["containers"])]
    assert gpu_pods
    for pod in gpu_pods:
        annotations = pod["metadata"]["annotations"]
        assert annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
        assert annotations["karpenter.sh/do-not-disrupt"] == "true"


# ---- weights ----

def _pairs(args: list[str]) -> set[tuple[str, str]]:
    assert len(args) % 2 == 0, args
    return set(zip(args[::2], args[1::2]))


@pytest.mark.parametrize("overlay", ["gpu", "gpu-triton"])
def test_every_reader_of_the_cache_pins_the_revision_the_job_downloads_and_marks(overlay):
    docs = render(overlay)
    job = objects(docs, "Job")["model-prefetch"]["spec"]["template"]["spec"]
    downloads = job["initContainers"] + job["containers"]
    fetched = set().union(*(_pairs(c["args"]) for c in downloads))
    assert {m for m, _ in fetched} == {DEFAULT_VLM_MODEL, DEFAULT_AUDIO_MODEL}
    for _, revision in fetched:
        # a commit: a branch name would let a re-run of the Job move what offline pods load
        assert re.fullmatch(r"[0-9a-f]{40}", revision), revision
    for c in downloads:  # the complete-mark is per revision, written after the download
        script = c["command"][2]
        assert '--revision "$2"' in script and '&& mkdir -p "$HF_HOME/prefetched/$1/$2"' in script
    readers = {}
    deployments = objects(docs, "Deployment")
    if overlay == "gpu":
        for name in MODEL_SERVICES:
            values = env(container(docs, name))
            readers[name] = {(values[_setting_env(name, "model")], values[_setting_env(name, "revision")])}
            (wait,) = deployments[name]["spec"]["template"]["spec"]["initContainers"]
            assert _pairs(wait["args"]) == readers[name]
            assert '"$HF_HOME/prefetched/$1/$2"' in wait["command"][2]
    else:
        values = env(container(docs, "triton"))
        readers["triton"] = {(values[f"I2S_TRITON_{k}_CHECKPOINT"], values[f"I2S_TRITON_{k}_REVISION"])
                             for k in ("VLM", "AUDIO")}
        (wait,) = deployments["triton"]["spec"]["template"]["spec"]["initContainers"]
        assert _pairs(wait["args"]) == readers["triton"]
        assert '"$HF_HOME/prefetched/$1/$2"' in wait["command"][2]
    for name, pinned in readers.items():
        assert pinned <= fetched, name
    assert set().union(*readers.values()) == fetched


def test_model_cache_storage_class_is_the_overlays_parameter():
    kustomization = yaml.safe_load((K8S / "overlays" / "gpu" / "kustomization.yaml").read_text())
    assert any(p.get("target", {}).get("name") == "model-cache" and "storageClassName" in p["patch"]
               for p in kustomization["patches"])
    (claim,) = objects(render("gpu"), "PersistentVolumeClaim").values()
    assert claim["spec"]["storageClassName"] and claim["spec"]["accessModes"] == ["ReadWriteMany"]


# ---- limits against admission ----

ORCHESTRATOR_BASE_MIB = 512  # the process itself: Python, gRPC, protobuf (deploy/README.md, "Limits")


def _mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024 ** 2}
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i)", quantity).groups()
    return float(number) * units[unit]


@each_rendering
def test_orchestrator_memory_limit_holds_every_image_admission_lets_in(rendering):
    from serving.images import ImageLimits

    docs = render(*rendering)
    admitted = (_setting_value(docs, "orchestrator", "max_images_waiting")
                + _setting_value(docs, "orchestrator", "max_images_total"))
    image_mib = ImageLimits().max_bytes / 2 ** 20
    limit = _mebibytes(container(docs, "orchestrator")["resources"]["limits"]["memory"])
    assert limit >= ORCHESTRATOR_BASE_MIB + admitted * image_mib, (limit, admitted)


# ---- monitoring and outside access ----

def test_prometheus_objects_carry_the_label_the_operator_selects_and_rules_use_real_series():
    docs = render("gpu", ("service-monitor",))
    (monitor,) = objects(docs, "ServiceMonitor").values()
    (rules,) = objects(docs, "PrometheusRule").values()
    assert monitor["metadata"]["labels"]["release"] == rules["metadata"]["labels"]["release"] != ""
    exposed = set()
    for name in _metric_names():
        exposed |= {name, f"{name}_total", f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    alerts = {r["alert"]: r["expr"] for g in rules["spec"]["groups"] for r in g["rules"]}
    assert len(alerts) >= 4
    for alert, expr in alerts.items():
        series = set(re.findall(r"\b(?:i2s|kube)_[a-z_]+\b", expr))
        assert series, alert
        assert {s for s in series if s.startswith("i2s_")} <= exposed, alert
    deployments = set(re.search(r'deployment=~"([^"]+)"', alerts["ImageToSoundNoServingBackend"]).group(1).split("|"))
    assert set(SERVICES) <= deployments


def test_grpc_route_reaches_the_orchestrator_on_its_public_host_over_tls():
    docs = render("gpu", ("tls", "gateway"))
    (gateway,) = objects(docs, "Gateway").values()
    (route,) = objects(docs, "GRPCRoute").values()
    listeners = {l["name"]: l for l in gateway["spec"]["listeners"]}
    (parent,) = route["spec"]["parentRefs"]
    listener = listeners[parent["sectionName"]]
    assert parent["name"] == gateway["metadata"]["name"]
    assert listener["protocol"] == "HTTPS" and listener["tls"]["mode"] == "Terminate"
    assert listener["tls"]["certificateRefs"] and route["spec"]["hostnames"] == [listener["hostname"]]
    (rule,) = route["spec"]["rules"]
    assert {m["method"]["service"] for m in rule["matches"]} >= {SERVICES["orchestrator"].health_name}
    (backend,) = rule["backendRefs"]
    service = objects(docs, "Service")[backend["name"]]
    assert backend["name"] == "orchestrator" and backend["port"] == SERVICES["orchestrator"].port
    assert backend["port"] in {p["port"] for p in service["spec"]["ports"]}


def test_what_the_readme_applies_and_names_exists_and_renders():
    from tests.deploy.manifests import ROOT, _kustomize

    text = (DEPLOY / "README.md").read_text()
    applied = set(re.findall(r"(?:-k|kubectl kustomize) (deploy/k8s/[\w/-]+)", text))
    assert {"deploy/k8s/overlays/gpu", "deploy/k8s/overlays/cpu-dev", "deploy/k8s/overlays/gpu-triton"} <= applied
    for path in applied:
        assert yaml.safe_load_all(_kustomize(ROOT / path)), path
    named = set(re.findall(r"\bcomponents/([a-z][\w-]*)", text))
    assert named == set(COMPONENTS), named ^ set(COMPONENTS)
    assert "rollout status deploy/$d" in text  # one resource per call
    assert not re.search(r"rollout status (deploy/\w+ ){2,}", text)
