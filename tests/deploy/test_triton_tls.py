"""The Triton hop under components/tls: a real Triton (the binary nvidia-pytriton ships) started with the TLS
flags the component gives the Triton pod, and the model services' Triton client configured by the variables
the component gives them (serving.triton_client.TritonTls): mutual TLS gets through, plaintext and a client
without its certificate do not. No model is needed for that, so the repository is empty (quick to start).
Then the audio model behind the same flags, while the audio service's client certificate is rotated."""
from __future__ import annotations

import shutil

import numpy as np
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


@pytest.fixture(scope="module")
def audio_triton_for_rotation(tmp_path_factory, tiny_audio_dir):
    """Triton with the component's TLS flags serving the audio model (tiny checkpoint): its certificate from
    CA 1, and it accepts clients of CA 1 and CA 2 (mid-rotation, both generations are trusted); a rogue
    CA's clients are refused."""
    from tests.deploy.triton_server import render_repository
    from tests.security.pki import CertificateAuthority

    work = tmp_path_factory.mktemp("triton-rotation")
    cas = {name: CertificateAuthority(work / name, name) for name in ("ca1", "ca2", "rogue")}
    served = cas["ca1"].issue("triton", server=True)
    (work / "clients-ca.pem").write_bytes(cas["ca1"].cert_file.read_bytes() + cas["ca2"].cert_file.read_bytes())
    local = {"/etc/i2s/tls/tls.crt": served.cert, "/etc/i2s/tls/tls.key": served.key,
             "/etc/i2s/tls/ca.crt": work / "clients-ca.pem"}
    args, _ = _component_settings()
    flags = [f"{name}={local.get(value, value)}" for name, _, value in (arg.partition("=") for arg in args)]
    repository = render_repository(work / "models")
    shutil.rmtree(repository / "vlm")  # the audio model only
    clients = {name: ca.issue(f"{name}-client", server=False) for name, ca in cas.items()}
    first = TritonTls(str(cas["ca1"].cert_file), str(clients["ca1"].cert), str(clients["ca1"].key))
    server = TritonServer(repository, work, {"I2S_TRITON_AUDIO_CHECKPOINT": str(tiny_audio_dir)},
                          extra_args=tuple(flags), client_options=first.client_options())
    server.start()
    yield server, cas, clients, work
    server.stop()


def test_the_audio_services_triton_client_certificate_rotates_while_it_serves(audio_triton_for_rotation):
    from audio_service.backend import AudioRequest
    from audio_service.triton_backend import TritonAudioBackend
    from serving.errors import NotReady
    from tests.security.pki import MountedSecret

    server, cas, clients, work = audio_triton_for_rotation
    secret = MountedSecret(work / "audio-tls")  # the audio service's Secret, as the kubelet mounts it
    secret.update(**{"tls.crt": clients["ca1"].cert, "tls.key": clients["ca1"].key})
    tls = TritonTls(str(cas["ca1"].cert_file), secret["tls.crt"], secret["tls.key"])
    backend = TritonAudioBackend(server.url, tls=tls, readiness_ttl_seconds=0.0)
    backend.load()
    request = AudioRequest(prompt="a kettle whistles", duration_seconds=1.0, num_inference_steps=2, seed=3)
    try:
        reference = backend.generate([request])[0].waveform
        assert reference.shape == (16000,)
        credentials = backend._clients.credentials

        # Half a rotation (the next key with the old certificate): unusable, the previous pair is kept.
        secret.update(**{"tls.crt": clients["ca1"].cert, "tls.key": clients["ca2"].key})
        np.testing.assert_array_equal(backend.generate([request])[0].waveform, reference)
        assert credentials.loads == 1

        # The next call after a rotation uses the new certificate: one Triton does not trust is refused ...
        secret.update(**{"tls.crt": clients["rogue"].cert, "tls.key": clients["rogue"].key})
        with pytest.raises(NotReady):
            backend.generate([request])
        assert not backend.ready
        # ... and the next generation's certificate is served, with no restart of anything.
        secret.update(**{"tls.crt": clients["ca2"].cert, "tls.key": clients["ca2"].key})
        np.testing.assert_array_equal(backend.generate([request])[0].waveform, reference)
        assert backend.ready and credentials.loads == 3
    finally:
        backend.close()
