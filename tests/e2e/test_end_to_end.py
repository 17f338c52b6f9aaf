"""End to end: the three services as separate processes on loopback with the tiny checkpoints,
driven through the client and through the seed's command line."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import soundfile as sf

from image_to_sound.v1 import common_pb2, orchestrator_pb2 as pb
from i2s_client import ImageToSoundClient, collect, make_request
from i2s_cli.embedded import EmbeddedServices
from i2s_cli.phase2 import FOLDERS
from i2s_formats.seed_format import read_seed_file
from tests.vlm_fixtures import description_schema
from vlm_service.rules import to_compact_dict

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = sorted(p for p in (ROOT / "data").rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"})
SECONDS = 1.0
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def services(tiny_vlm_dir, tiny_audio_dir):
    embedded = EmbeddedServices(vlm_model=str(tiny_vlm_dir), audio_model=str(tiny_audio_dir), device="cpu",
                                start_timeout_seconds=600)
    embedded.start()
    yield embedded
    codes = embedded.stop()
    # SIGTERM is a clean shutdown: NOT_SERVING, drain, exit 0.
    assert codes == {"vlm": 0, "audio": 0, "orchestrator": 0}


def test_every_photo_gets_a_description_and_a_clip_per_variant(services, early_audio_required=True):
    config = pb.StreamConfig(
        audio=common_pb2.AudioSettings(duration_seconds=SECONDS, num_inference_steps=2, seed=1),
        decoding=common_pb2.DecodingSettings(max_new_tokens=1024),
    )
    requests = [make_request(p, request_id=p.name) for p in PHOTOS]
    requests.insert(2, make_request(PHOTOS[0].read_bytes()[:2000], request_id="truncated"))  # a corrupt image among them
    with ImageToSoundClient(services.target, timeout=600) as client:
        results = collect(client.stream_many(requests, config=config))
    assert set(results) == {p.name for p in PHOTOS} | {"truncated"}
    failed = results.pop("truncated")
    assert failed.error is not None and failed.error.code == 3 and "truncated or corrupt" in failed.error.message
    schema = description_schema()
    pipelined = first_audio_early = 0
    for name, result in results.items():
        assert result.error is None, (name, result.error)
        jsonschema.validate(to_compact_dict(result.description), schema)
        variants = {v.id for s in result.description.sources for v in s.variants}
        clips = {c.ref.variant_id: c for c in result.clips}
        assert set(clips) == variants, name
        for clip in clips.values():
            assert clip.done and clip.waveform.shape == (int(SECONDS * 16000),)
            assert clip.metadata.prompt and clip.metadata.num_samples == 16000
        summary = result.summary
        assert summary.clips_done == len(variants) and summary.clips_failed == 0
        pipelined += summary.clips_started_while_describing
        first_audio_early += summary.first_audio_while_describing
        print(f"{name}: {len(result.description.sources)} sources, {len(variants)} clips, "
              f"first audio {summary.time_to_first_audio_seconds:.2f} s, total {summary.total_seconds:.2f} s, "
              f"clips started while describing {summary.clips_started_while_describing}, "
              f"first audio while describing {summary.first_audio_while_describing}")
    # Pipelining observed on the real processes: audio was requested, and audio arrived, while the VLM was
    # still decoding the same image (it streams each source as it closes; the tiny VLM needs ~2 s for its
    # ~700 tokens, a 1 s two-step clip ~0.3 s). Seen for 5 of 5 photos here; one is required.
    assert pipelined > 0
    if early_audio_required:  # the Triton variant calls this with False (tests/deploy/test_triton.py says why)
        assert first_audio_early >= 1


def test_the_command_line_writes_the_seed_tree(tmp_path, tiny_vlm_dir, tiny_audio_dir):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    shutil.copy(ROOT / "data" / "coffee.png", data / "coffee.png")
    shutil.copy(ROOT / "data" / "space" / "rocket.jpg", data / "sub" / "ROCKET.JPG")
    command = [sys.executable, str(ROOT / "main.py"), "--vlm_model", str(tiny_vlm_dir), "--audio_model",
               str(tiny_audio_dir), "--device", "cpu", "--audio_seconds", "1", "--audio_steps", "2",
               "--scene_mix", "--export_phase2", "phase2", "--save_log", "run.log"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 image(s): 2 done" in done.stderr
    for stem in ("coffee", "ROCKET"):
        description = read_seed_file(tmp_path / "sound_sources" / stem / f"{stem}_sound_source.json")
        manifest = json.loads((tmp_path / "result" / stem / "prompts.json").read_text())
        wavs = sorted(p.name for p in (tmp_path / "result" / stem).glob("[0-9][0-9]_*.wav"))
        assert wavs == [c["file"] for c in manifest["clips"]]
        assert len(wavs) == sum(len(s.variants) for s in description.sources)
        for wav in wavs:
            info = sf.info(tmp_path / "result" / stem / wav)
            assert (info.samplerate, info.channels, info.subtype, info.frames) == (16000, 1, "PCM_16", 16000)
        assert (tmp_path / "result" / stem / "scene_mix.wav").is_file()
    # Phase 2 export: exactly the clips with an instrument role, each copied into its instrument's folder.
    expected = {}
    for stem in ("coffee", "ROCKET"):
        for clip in json.loads((tmp_path / "result" / stem / "prompts.json").read_text())["clips"]:
            if clip["instrument"] != "None":
                expected[f"{FOLDERS[clip['instrument']]}/{stem}__{clip['file']}"] = (stem, clip["file"])
    exported = json.loads((tmp_path / "phase2" / "manifest.json").read_text())["clips"]
    assert sorted(c["file"] for c in exported) == sorted(expected)
    print(f"phase2: {len(exported)} of the clips exported (the tiny VLM picks the roles at random)")
    for clip in exported:
        stem, file = expected[clip["file"]]
        assert clip["file"].split("/")[0] == clip["instrument"]
        assert (tmp_path / "phase2" / clip["file"]).read_bytes() == (tmp_path / "result" / stem / file).read_bytes()
    assert (tmp_path / "run.log").read_text().count("2 image(s)") == 1
    # Again: all complete, nothing to do, and the services are not even started.
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "nothing to do" in again.stderr
