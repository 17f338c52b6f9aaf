"""The seed's command line against the real orchestrator with fake model services (--orchestrator)."""
import asyncio
import json
import shutil
from pathlib import Path

import pytest
import soundfile as sf

from i2s_cli import cli
from orchestrator import prompts
from tests.fake_services import FakeAudioServicer, fake_stack

ROOT = Path(__file__).resolve().parents[2]
BOUND = 120


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A copy of data/ plus an odd-case extension, in a fresh working folder."""
    shutil.copytree(ROOT / "data", tmp_path / "data")
    shutil.copy(ROOT / "data" / "coffee.png", tmp_path / "data" / "UPPER.PNG")
    (tmp_path / "data" / "notes.txt").write_text("not an image")
    monkeypatch.chdir(tmp_path)
    return tmp_path


async def run_cli(target: str, *args: str) -> int:
    argv = ["--orchestrator", target, "--no_progress", "--audio_seconds", "1", *args]
    return await asyncio.wait_for(asyncio.to_thread(cli.main, argv), BOUND)


STEMS = ["UPPER", "astronaut", "camera", "chelsea", "coffee", "rocket"]


def wavs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.wav"))


async def test_batch_writes_the_seed_tree_and_resumes(workspace):
    async with fake_stack() as (target, vision, audio):
        assert await run_cli(target, "--save_log", "run.log") == 0
        assert sorted(p.name for p in (workspace / "sound_sources").iterdir()) == STEMS
        for stem in STEMS:
            description = json.loads((workspace / "sound_sources" / stem / f"{stem}_sound_source.json").read_text())
            assert set(description) == {"scene_description", "mood_description", "sound_sources"}
            result = workspace / "result" / stem
            assert wavs(result) == [f"{i:02d}_source_{s}_action_{v}.wav" for i, (s, v) in
                                    enumerate([(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)], 1)]
            manifest = json.loads((result / "prompts.json").read_text())
            assert [c["file"] for c in manifest["clips"]] == wavs(result)
            assert all(c["prompt"] and c["instrument"] == "drums" for c in manifest["clips"])
            assert {c["prompt_style"] for c in manifest["clips"]} == {prompts.PROMPT_STYLE_VERSION}
            info = sf.info(result / wavs(result)[0])
            assert (info.samplerate, info.channels, info.subtype, info.frames) == (16000, 1, "PCM_16", 16000)
        assert "6 image(s): 6 done" in (workspace / "run.log").read_text()
        calls = (vision.calls, len(audio.prompts))
        assert calls == (6, 36)

        # Run again: everything complete, nothing is redone.
        assert await run_cli(target) == 0
        assert (vision.calls, len(audio.prompts)) == calls

        # An interrupted run: one clip and the manifest missing, a half-written temp file left over.
        (workspace / "result" / "coffee" / "03_source_2_action_1.wav").unlink()
        (workspace / "result" / "coffee" / "prompts.json").unlink()
        (workspace / "result" / "coffee" / ".03_source_2.x.wav.part").write_bytes(b"junk")
        assert await run_cli(target) == 0
        assert vision.calls == 6  # the description existed: no VLM call
        assert len(audio.prompts) == 36 + 6  # only coffee's audio was redone
        assert len(wavs(workspace / "result" / "coffee")) == 6
        assert not list((workspace / "result" / "coffee").glob(".*"))  # the leftover temp file is gone


async def test_single_skip_audio_then_skip_vlm(workspace):
    async with fake_stack() as (target, vision, audio):
        assert await run_cli(target, "--single", "data/animals/chelsea.png", "--skip_audio") == 0
        assert (workspace / "sound_sources" / "chelsea" / "chelsea_sound_source.json").is_file()
        assert not (workspace / "result").exists() and audio.prompts == []
        assert await run_cli(target, "--single", "data/animals/chelsea.png", "--skip_vlm") == 0
        assert vision.calls == 1 and len(wavs(workspace / "result" / "chelsea")) == 6


@pytest.mark.parametrize("variant", ["current", "objects_key", "no_confidence", "instrument_null", "instrument_absent"])
async def test_skip_vlm_reads_every_seed_variant(workspace, variant):
    v = {"play_method": "barking loudly", "timbre": ["sharp"], "mapping_to_music_instrument": "drums", "confidence": 0.9}
    if variant == "no_confidence":
        del v["confidence"]
    if variant == "instrument_null":
        v["mapping_to_music_instrument"] = None
    if variant == "instrument_absent":
        del v["mapping_to_music_instrument"]
    sources = [{"name": "dog", "material": "fur", "variants": [v]}, {"name": "gate", "material": "iron",
               "variants": [{"play_method": "creaking", "timbre": ["squeaky"], "mapping_to_music_instrument": "None"}]}]
    data = {"scene_description": "a yard", "mood_description": "lively",
            ("objects" if variant == "objects_key" else "sound_sources"): sources}
    folder = workspace / "sound_sources" / "coffee"
    folder.mkdir(parents=True)
    (folder / "coffee_sound_source.json").write_text(json.dumps(data))
    async with fake_stack() as (target, vision, audio):
        # No --single: the one description is rendered; the five other photos in data/ are not its business.
        assert await run_cli(target, "--skip_vlm") == 0
    assert vision.calls == 0
    assert sorted(p.name for p in (workspace / "result").iterdir()) == ["coffee", "index.html"]  # + the gallery
    assert wavs(workspace / "result" / "coffee") == ["01_dog_barking_loudly.wav", "02_gate_creaking.wav"]
    assert any("dog" in p.lower() and "bark" in p.lower() for p in audio.prompts)


def seed_description(name: str, actions: list[str]) -> dict:
    """A description file as the seed wrote it: one source, one variant per action."""
    variants = [{"play_method": a, "timbre": ["sharp"], "mapping_to_music_instrument": "drums", "confidence": 0.9}
                for a in actions]
    return {"scene_description": f"a scene with a {name}", "mood_description": "calm",
            "sound_sources": [{"name": name, "material": "wood", "variants": variants}]}


@pytest.fixture
def descriptions_only(tmp_path, monkeypatch):
    """A researcher's folder of descriptions (one folder per image, one nested deeper), one of them
    malformed, and no image anywhere: no data/ folder at all."""
    tree = {"alpha": ["knocking", "creaking"], "beta": ["rolling"], "more/gamma": ["tapping", "scraping", "thudding"]}
    for folder, actions in tree.items():
        stem = folder.split("/")[-1]
        path = tmp_path / "descs" / folder / f"{stem}_sound_source.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(seed_description(stem, actions)))
    (tmp_path / "descs" / "broken").mkdir()
    (tmp_path / "descs" / "broken" / "broken_sound_source.json").write_text('{"scene_description": "cut off')
    (tmp_path / "descs" / "alpha" / "notes.json").write_text("{}")  # not a description file: ignored
    monkeypatch.chdir(tmp_path)
    return tmp_path


async def test_skip_vlm_renders_every_description_without_images(descriptions_only):
    root = descriptions_only
    broken = str(Path("descs") / "broken" / "broken_sound_source.json")
    async with fake_stack() as (target, vision, audio):
        code = await run_cli(target, "--skip_vlm", "--sound_sources_dir", "descs", "--save_log", "run.log")
        assert code == 1  # the malformed file failed; the others rendered
        assert vision.calls == 0
        expected = {"alpha": ["01_alpha_knocking.wav", "02_alpha_creaking.wav"], "beta": ["01_beta_rolling.wav"],
                    "gamma": ["01_gamma_tapping.wav", "02_gamma_scraping.wav", "03_gamma_thudding.wav"]}
        assert sorted(p.name for p in (root / "result").iterdir() if p.is_dir()) == sorted(expected)  # nothing for "broken"
        for stem, files in expected.items():
            assert wavs(root / "result" / stem) == files
            manifest = json.loads((root / "result" / stem / "prompts.json").read_text())
            assert [c["file"] for c in manifest["clips"]] == files
            assert Path(manifest["description"]).name == f"{stem}_sound_source.json"
        assert len(audio.prompts) == 6
        log_text = (root / "run.log").read_text()
        assert f"FAILED {broken}: {broken}: not valid JSON" in log_text  # named, and why
        assert "4 description(s): 3 done, 0 skipped (already complete), 1 failed; 6 clip(s) written" in log_text
        read_line = next(line for line in log_text.splitlines() if "description file(s) read" in line)
        assert "3 description file(s) read" in read_line
        for folder in ("alpha/alpha", "beta/beta", "more/gamma/gamma"):
            assert str(Path("descs") / f"{folder}_sound_source.json") in read_line
        assert "broken" not in read_line

        # The file repaired: the next run renders it alone (the others are complete) and succeeds.
        (root / "descs" / "broken" / "broken_sound_source.json").write_text(json.dumps(seed_description("bell", ["ringing"])))
        assert await run_cli(target, "--skip_vlm", "--sound_sources_dir", "descs") == 0
        assert len(audio.prompts) == 7 and wavs(root / "result" / "broken") == ["01_bell_ringing.wav"]

        # --single picks one description by the image's stem; the image itself need not exist.
        assert await run_cli(target, "--skip_vlm", "--sound_sources_dir", "descs", "--single", "photos/beta.jpg",
                             "--overwrite") == 0
        assert len(audio.prompts) == 8 and "rolling" in audio.prompts[-1].lower()
        assert await run_cli(target, "--skip_vlm", "--sound_sources_dir", "descs", "--single",
                             "descs/more/gamma/gamma_sound_source.json", "--overwrite") == 0
        assert len(audio.prompts) == 11


async def test_skip_vlm_without_a_description_fails_that_image(descriptions_only):
    async with fake_stack() as (target, _, audio):
        # Descriptions exist, but none for this image: that is a failure, and nothing else is rendered.
        assert await run_cli(target, "--single", "data/coffee.png", "--skip_vlm", "--sound_sources_dir", "descs") == 1
        assert audio.prompts == [] and not (descriptions_only / "result").exists()
        # No such folder at all: a usage error.
        assert await run_cli(target, "--skip_vlm", "--sound_sources_dir", "missing") == 2


async def test_skip_vlm_refuses_two_descriptions_for_one_output_folder(descriptions_only):
    twin = descriptions_only / "descs" / "other" / "beta" / "beta_sound_source.json"
    twin.parent.mkdir(parents=True)
    twin.write_text(json.dumps(seed_description("beta", ["humming", "buzzing"])))
    async with fake_stack() as (target, _, audio):
        assert await run_cli(target, "--skip_vlm", "--sound_sources_dir", "descs", "--save_log", "run.log") == 1
    assert wavs(descriptions_only / "result" / "beta") == ["01_beta_rolling.wav"]  # the first found, alone
    assert not any("humming" in p.lower() for p in audio.prompts)
    assert f"FAILED {twin.relative_to(descriptions_only)}: same file name stem as" in (descriptions_only / "run.log").read_text()


async def test_failures_give_a_non_zero_exit_and_do_not_stop_the_batch(workspace):
    (workspace / "data" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    async with fake_stack(audio=FakeAudioServicer(fail_word="source 3")) as (target, _, _):
        assert await run_cli(target) == 1
    for stem in STEMS:  # the other images still got their descriptions and clips
        assert (workspace / "sound_sources" / stem / f"{stem}_sound_source.json").is_file()
        assert len(wavs(workspace / "result" / stem)) == 4
        # Not complete (2 clips failed): no prompts.json, so the next run redoes the image.
        assert not (workspace / "result" / stem / "prompts.json").exists()
    assert not (workspace / "sound_sources" / "broken").exists()


async def test_export_phase2_lays_clips_out_by_instrument(workspace):
    async with fake_stack() as (target, _, _):
        assert await run_cli(target, "--single", "data/coffee.png", "--export_phase2", "phase2") == 0
    manifest = json.loads((workspace / "phase2" / "manifest.json").read_text())
    assert len(manifest["clips"]) == 6
    assert {c["instrument"] for c in manifest["clips"]} == {"drum"}
    for clip in manifest["clips"]:
        assert (workspace / "phase2" / clip["file"]).is_file() and clip["file"].startswith("drum/coffee__")


def test_find_images_is_recursive_and_case_insensitive(workspace):
    found = [p.name for p in cli.find_images(Path("data"))]
    assert sorted(found) == sorted(["UPPER.PNG", "astronaut.png", "camera.png", "chelsea.png", "coffee.png", "rocket.jpg"])


def test_long_loop_and_guard_flags_in_the_originals_style_reach_the_audio_settings():
    args = cli.build_parser().parse_args(["--audio_seconds", "120", "--loop", "--reject_speech_music", "2"])
    audio = cli.settings_from(args).audio
    assert (audio.duration_seconds, audio.loop, audio.reject_speech_music) == (120.0, True, 2)
    assert "sound settings" not in cli.check_inputs(args)
    plain = cli.settings_from(cli.build_parser().parse_args([])).audio
    assert (plain.loop, plain.reject_speech_music) == (False, 0)
