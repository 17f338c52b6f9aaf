"""What the deploy tests look at: the rendered kustomize overlays (and overlays combined with the optional
components), and what each service reads (its config class, port, env prefix, health service name)."""
from __future__ import annotations

import functools
import importlib
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from serving.config import Setting, settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
COMPONENTS = sorted(p.name for p in (K8S / "components").iterdir() if (p / "kustomization.yaml").exists())
# The optional components on top of the overlays they are meant for (triton: GPU clusters, in gpu-triton).
COMBINATIONS = [
    ("gpu", ("tls",)),
    ("cpu-dev", ("tls",)),
    ("gpu", ("service-monitor", "model-autoscaling")),
    ("cpu-dev", ("service-monitor", "model-autoscaling")),
    ("gpu-triton", ("tls", "service-monitor")),
    ("gpu", ("gpu-node-labels", "keda-autoscaling", "service-monitor")),
    ("cpu-dev", ("keda-autoscaling",)),
    ("gpu", ("tls", "gateway")),
]
RENDERINGS = [(o, ()) for o in OVERLAYS] + COMBINATIONS

@dataclass(frozen=True)
class Service:
    """One of the three services as its code defines it."""

    name: str  # the Deployment / container / Service name in the manifests
    package: str  # vlm_service, audio_service, orchestrator

    @functools.cached_property
    def config_module(self):
        return importlib.import_module(f"{self.package}.config")

    @property
    def config_class(self) -> type:
        return next(v for k, v in vars(self.config_module).items() if k.endswith("Config") and isinstance(v, type))

    @property
    def prefix(self) -> str:
        return self.config_module.ENV_PREFIX

    @property
    def port(self) -> int:
        return self.config_module.DEFAULT_PORT

    @property
    def health_name(self) -> str:
        """The gRPC service name the server reports health under (from the generated stubs' DESCRIPTOR)."""
        return importlib.import_module(f"{self.package}.server").SERVICE_NAME

    @functools.cached_property
    def settings(self) -> dict[str, Setting]:
        """Environment variable name -> setting, for every setting the service reads."""
        return {s.env_name(self.prefix): s for s in settings(self.config_class)}



SERVICES = {s.name: s for s in (Service("vlm", "vlm_service"), Service("audio", "audio_service"),
                                Service("orchestrator", "orchestrator"))}


@functools.lru_cache(maxsize=None)
def render(overlay: str, components: tuple[str, ...] = ()) -> tuple[dict, ...]:
    """`kubectl kustomize` of an overlay, with components added through a throwaway kustomization."""
    if not components:
        out = _kustomize(K8S / "overlays" / overlay)
    else:
        # as an operator adds components: in a kustomization that names the namespace (objects the
        # components bring get it from there)
        namespace = next(d["metadata"]["name"] for d in render(overlay) if d["kind"] == "Namespace")
        with tempfile.TemporaryDirectory() as tmp:
            # kustomize refuses absolute paths to resources and components
            rel = os.path.relpath(K8S, tmp)
            Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump({
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": namespace,
                "resources": [f"{rel}/overlays/{overlay}"],
                "components": [f"{rel}/components/{c}" for c in components],
            }))
            out = _kustomize(Path(tmp))
    return tuple(d for d in yaml.safe_load_all(out) if d)


def _kustomize(path: Path) -> str:
    result = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return result.stdout


def objects(docs, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs) -> list[tuple[str, dict]]:
    """(owner, pod spec) of every Deployment and Job."""
    specs = [(f"Deployment/{n}", d["spec"]["template"]["spec"]) for n, d in objects(docs, "Deployment").items()]
    specs += [(f"Job/{n}", d["spec"]["template"]["spec"]) for n, d in objects(docs, "Job").items()]
    return specs


def container(docs, deployment: str) -> dict:
    spec = objects(docs, "Deployment")[deployment]["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == deployment)


def env(c: dict) -> dict[str, str | None]:
    """name -> literal value (None for valueFrom)."""
    return {e["name"]: e.get("value") for e in c.get("env", [])}
