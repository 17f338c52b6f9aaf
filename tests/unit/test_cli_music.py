"""Material for music through the command line (real orchestrator, fake model services): boxes through the
stream, the description file and prompts.json; loudness and rate in every file; mix.json rebuilding the
stereo mix; the Phase 2 export validated against its schema, and a broken one refused with its field."""
import asyncio
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from i2s_cli import cli
from i2s_cli.phase2 import export_phase2
from i2s_formats import audio_encoding, boxes, json_schemas, loudness, seed_format, stereo_mix
from image_to_sound.v1 import common_pb2
from tests.fake_services import FakeVisionServicer, fake_stack, scripted_description

ROOT = Path(__file__).resolve().parents[2]
BOUND = 120
BOXES = [(0.02, 0.3, 0.2, 0.6), (0.7, 0.1, 0.95, 0.5), None]  # left, right, no box (ambience)


def located_description() -> common_pb2.SceneDescription:
    description = scripted_description(sources=3, variants=1)
    for source, box in zip(description.sources, BOXES):
        if box is not None:
            source.location.CopyFrom(boxes.to_location(box))
    return description


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    shutil.copy(ROOT / "data" / "coffee.png", tmp_path / "data" / "coffee.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


async def run_cli(target: str, *args: str) -> int:
    argv = ["--orchestrator", target, "--no_progress", "--audio_seconds", "1.5", *args]
    return await asyncio.wait_for(asyncio.to_thread(cli.main, argv), BOUND)


async def test_boxes_loudness_rate_mix_json_and_export(workspace):
    vision = FakeVisionServicer(description=located_description())
    async with fake_stack(vision=vision) as (target, _, _):
        assert await run_cli(target, "--locate_sources", "--loudness_target", "-18", "--sample_rate", "48000",
                             "--scene_mix", "--export_phase2", "phase2") == 0
    result = workspace / "result" / "coffee"
    # The box round-trips: proto -> stream -> description file -> prompts.json -> export.
    described = seed_format.read_seed_file(workspace / "sound_sources" / "coffee" / "coffee_sound_source.json")
    assert [boxes.to_list(s.location) if s.HasField("location") else None for s in described.sources] == \
        [list(b) if b else None for b in BOXES]
    prompts = json.loads((result / "prompts.json").read_text())
    assert [c["box"] for c in prompts["clips"]] == [list(b) if b else None for b in BOXES]
    for clip in prompts["clips"]:
        info = sf.info(result / clip["file"])
        assert (info.samplerate, info.channels) == (48000, 1) and abs(info.frames - 1.5 * 48000) <= 1
        assert clip["sample_rate_hertz"] == 48000 and abs(clip["loudness_lufs"] + 18) < 0.5 and clip["peak_dbfs"] <= -1
    # The stereo mix: at its target under the ceiling, and mix.json rebuilds it.
    data = json.loads((result / "mix.json").read_text())
    json_schemas.validate(data, json_schemas.MIX)
    assert prompts["scene_mix_data"] == "mix.json" and abs(prompts["scene_mix_level"]["loudness_lufs"] + 18) < 0.5
    saved, rate = audio_encoding.read_wav(result / data["file"])
    assert rate == 48000 and saved.shape[1] == 2
    level = loudness.measure(saved, rate)
    assert abs(level.lufs + 18) < 0.5 and level.peak_dbfs <= -1 + 1e-3
    pans = [s["pan"] for s in data["stems"]]
    assert pans[0] < -0.5 < 0.5 < pans[1] and data["stems"][2]["wide_delay_samples"] > 0
    rebuilt = stereo_mix.render(stereo_mix.from_json(data), {
        s["clip_id"]: audio_encoding.read_wav(result / s["file"]) for s in data["stems"]})
    assert 20 * math.log10(max(float(np.max(np.abs(rebuilt - saved))), 1e-12)) < -80
    # The export: every field the next stage needs, validated, the mix folder self-contained.
    manifest = json.loads((workspace / "phase2" / "manifest.json").read_text())
    json_schemas.validate(manifest, json_schemas.PHASE2_MANIFEST)
    assert [c["box"] for c in manifest["clips"]] == [list(b) if b else None for b in BOXES]
    assert all(c["sample_rate_hertz"] == 48000 and c["loudness_lufs"] is not None for c in manifest["clips"])
    assert [c["pan"] for c in manifest["clips"]] == pans
    # The gallery: the boxes over the picture, every clip's loudness, the stereo mix with its data.
    gallery = (workspace / "result" / "index.html").read_text()
    assert gallery.count('class="box" data-source=') == 2 and 'data-source="source 1"' in gallery
    assert gallery.count('class="number loudness">-1') == 3 and "Stereo scene mix" in gallery
    assert 'href="coffee/mix.json"' in gallery
    (mix_entry,) = manifest["mixes"]
    exported = json.loads((workspace / "phase2" / mix_entry["mix"]).read_text())
    folder = (workspace / "phase2" / mix_entry["mix"]).parent
    assert all((folder / s["file"]).is_file() for s in exported["stems"]) and (folder / exported["file"]).is_file()


async def test_without_the_new_flags_the_description_file_is_the_seeds(workspace):
    async with fake_stack() as (target, _, _):
        assert await run_cli(target) == 0
    text = (workspace / "sound_sources" / "coffee" / "coffee_sound_source.json").read_text()
    assert '"box"' not in text and text == seed_format.dumps_seed(seed_format.from_seed_dict(json.loads(text))) + "\n"
    clip = json.loads((workspace / "result" / "coffee" / "prompts.json").read_text())["clips"][0]
    assert clip["box"] is None and clip["sample_rate_hertz"] == 16000 and clip["loudness_gain_db"] == 0.0
    assert clip["loudness_lufs"] is not None  # measured always


def test_a_broken_export_is_refused_with_the_field_named_and_nothing_written(tmp_path):
    image = tmp_path / "result" / "img"
    image.mkdir(parents=True)
    audio_encoding.write_wav(image / "01_a.wav", np.zeros(16000, dtype=np.float32), 16000)
    clip = {"file": "01_a.wav", "instrument": "drums", "source": "a", "action": "b", "prompt": "c", "box": None,
            "loudness_lufs": None, "peak_dbfs": None, "sample_rate_hertz": 16000, "seed": "not a number"}
    (image / "prompts.json").write_text(json.dumps({"image": "img", "clips": [clip]}))
    with pytest.raises(json_schemas.SchemaError, match=r"\$\.clips\[0\]\.seed"):
        export_phase2(tmp_path / "result", tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()
    clip["seed"] = 3
    (image / "prompts.json").write_text(json.dumps({"image": "img", "clips": [clip]}))
    (image / "mix.json").write_text(json.dumps({"format": "i2s-scene-mix", "version": 1}))
    with pytest.raises(json_schemas.SchemaError, match="mix.schema.json: \\$: 'file' is a required property"):
        export_phase2(tmp_path / "result", tmp_path / "out")
    (image / "mix.json").unlink()
    assert export_phase2(tmp_path / "result", tmp_path / "out") == 1


@pytest.mark.parametrize("argv,words", [(["--loudness_target", "-80"], "loudness_target"),
                                        (["--loudness_target", "nan"], "loudness_target"),
                                        (["--sample_rate", "22050"], "sample_rate")])
def test_bad_music_flags_are_refused_before_anything_runs(argv, words, capsys):
    with pytest.raises(SystemExit) as raised:
        cli.build_parser().parse_args(argv)
    assert raised.value.code == 2 and words in capsys.readouterr().err


def test_a_box_round_trips_through_proto_json_lines_the_description_file_and_back():
    from google.protobuf import json_format
    from image_to_sound.v1 import orchestrator_pb2 as pb

    description = located_description()
    wire = pb.ImageToSoundEvent.FromString(pb.ImageToSoundEvent(description=description).SerializeToString())
    line = json_format.MessageToJson(wire)  # what JSON lines and Connect JSON carry
    back = json_format.Parse(line, pb.ImageToSoundEvent()).description
    from_file = seed_format.from_seed_dict(json.loads(seed_format.dumps_seed(back)))
    for original, sent, read in zip(description.sources, back.sources, from_file.sources):
        assert original.HasField("location") == sent.HasField("location") == read.HasField("location")
        if original.HasField("location"):
            assert original.location == sent.location == read.location
