"""The torch thread setting: each model service sizes torch's pool from --torch-threads, and embedded mode
shares the machine's cores between the model services it starts."""
import subprocess
import sys

from audio_service.config import parse_args as audio_args
from i2s_cli.embedded import EmbeddedServices
from serving.threads import threads_per_service
from vlm_service.config import parse_args as vlm_args


def test_the_setting_comes_from_the_flag_or_the_service_variable():
    assert vlm_args([]).threads.torch_threads == 0
    assert vlm_args(["--torch-threads", "3"]).threads.torch_threads == 3
    assert audio_args(["--model", "m"]).threads.torch_threads == 0
    from serving.config import parse_config
    from audio_service.config import AudioConfig

    config = parse_config(AudioConfig, [], prefix="AUDIO", prog="audio", description="",
                          environ={"I2S_AUDIO_TORCH_THREADS": "2"})
    assert config.threads.torch_threads == 2


def test_cores_are_divided_between_the_model_services():
    assert threads_per_service(2, cores=2) == 1
    assert threads_per_service(2, cores=16) == 8
    assert threads_per_service(1, cores=16) == 16
    assert threads_per_service(3, cores=2) == 1  # never zero


def test_embedded_mode_gives_each_model_service_its_share(monkeypatch):
    monkeypatch.setattr("serving.threads.available_cores", lambda: 8)
    both = EmbeddedServices(vlm_model="v", audio_model="a")
    assert both.model_threads() == 4
    assert EmbeddedServices(vlm_model=None, audio_model="a").model_threads() == 8  # --skip_vlm: one service
    assert EmbeddedServices(vlm_model="v", audio_model="a", torch_threads=3).model_threads() == 3


def test_a_service_process_applies_the_setting_before_its_model_loads():
    code = ("from serving.threads import ThreadOptions, apply_torch_threads; import torch; "
            "apply_torch_threads(ThreadOptions(torch_threads=1)); print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})
    assert out.stdout.strip() == "1"


def test_a_container_cpu_limit_bounds_the_cores(tmp_path, monkeypatch):
    from serving import threads

    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("250000 100000\n")  # limits.cpu: 2.5
    assert threads.cgroup_cpu_limit(str(cpu_max)) == 3
    cpu_max.write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(str(cpu_max)) is None
    assert threads.cgroup_cpu_limit(str(tmp_path / "absent")) is None
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 1)
    assert threads.available_cores() == 1
