"""The Triton hop under components/tls: a real Triton (the binary nvidia-pytriton ships) started with the TLS
flags the component gives the Triton pod, and the model services' Triton client configured by the variables
the component gives them (serving.triton_client.TritonTls): mutual TLS gets through, plaintext and a client
without its certificate do not. No model is needed for that, so the repository is empty (quick to start)."""
from __future__ import annotations

import pytest

from serving.triton_client import TritonTls
from tests.deploy.manifests import objects, render
from tests.deploy.test_dockerfiles import _certificates
from tests.deploy.triton_server import TritonServer


def _component_settings():
    """The Triton pod's TLS flags and the VLM service's Triton TLS variables, from the rendered manifests."""
    docs = render("gpu-triton", ("tls",))
    triton = objects(docs, "Deployment")["triton"]["spec"]["template"]["spec"]["containers"][0]
    vlm = objects(docs, "Deployment")["vlm"]["spec"]["template"]["spec"]["containers"][0]
    return triton["args"], {e["name"]: e["value"] for e in vlm["env"]
                            if e["name"].startswith("I2S_VLM_TRITON_") and e["name"].endswith("_FILE")}


def _client_tls(local: dict) -> TritonTls:
    """What the VLM service builds from the component's variables (its config class reads them)."""
    from serving.config import parse_config
    from vlm_service.config import ENV_PREFIX, VlmConfig

    _, variables = _component_settings()
    config = parse_config(VlmConfig, [], prefix=ENV_PREFIX, prog="vlm", description="",
                          environ={k: str(local[v]) for k, v in variables.items()})
    return config.triton_tls


@pytest.fixture(scope="module")
def tls_triton(tmp_path_factory):
    work = tmp_path_factory.mktemp("triton-tls")
    paths = _certificates(work)
    args, _ = _component_settings()
    # the pod's Secret is mounted at /etc/i2s/tls; here the same files lie in `work`
    local = {"/etc/i2s/tls/tls.crt": paths["tls.crt"], "/etc/i2s/tls/tls.key": paths["tls.key"],
             "/etc/i2s/tls/ca.crt": paths["ca.crt"]}
    flags = []
    for arg in args:
        name, _, value = arg.partition("=")
        flags.append(f"{name}={local.get(value, value)}")
    (work / "models").mkdir()
    tls = _client_tls(local)
    server = TritonServer(work / "models", work, {}, extra_args=tuple(flags), client_options=tls.client_options(),
                          client_host="localhost")  # the name its certificate carries
    server.start(timeout_seconds=60)
    yield server, tls
    server.stop()


def test_the_tls_component_covers_the_triton_hop():
    args, variables = _component_settings()
    assert "--grpc-use-ssl=true" in args and "--grpc-use-ssl-mutual=true" in args
    assert set(variables) == {"I2S_VLM_TRITON_CA_FILE", "I2S_VLM_TRITON_CERT_FILE", "I2S_VLM_TRITON_KEY_FILE"}


def test_model_services_reach_triton_over_mutual_tls_only(tls_triton):
    import tritonclient.grpc as triton

    server, tls = tls_triton
    assert tls.triton_ca_file and tls.triton_cert_file and tls.triton_key_file
    with triton.InferenceServerClient(server.url, **tls.client_options()) as client:
        assert client.is_server_live(client_timeout=10)
    no_certificate = TritonTls(tls.triton_ca_file)
    for options in (no_certificate.client_options(), TritonTls().client_options()):  # one-way TLS, plaintext
        with triton.InferenceServerClient(server.url, **options) as client:
            with pytest.raises(Exception):
                client.is_server_live(client_timeout=5)
