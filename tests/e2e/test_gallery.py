"""The run's gallery (result/index.html) and the CLAP score per clip, on the real services with the tiny
checkpoints: main.py's code (i2s_cli.cli.main, the demo's flags) against embedded service processes.

Two runs share one set of services: the first renders one photo, the second is a resumed run that adds
another, so the gallery it leaves must show both. A spy on the command line's event handler keeps every
event; the chunks are requested as float32 (not PCM16) so the test holds the exact samples the audio
service scored.

Set I2S_GALLERY_SCREENSHOT=docs/screenshots/gallery.png to keep the browser's screenshot (how the one in
docs/ was made); otherwise it goes to the test's tmp folder.
"""
import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from image_to_sound.v1 import common_pb2, orchestrator_pb2 as pb
from i2s_cli import cli
from i2s_cli.embedded import EmbeddedServices
from i2s_formats import audio_encoding
from tests.browser import console_errors

ROOT = Path(__file__).resolve().parents[2]
SECONDS = 1.0
PHOTOS = {"coffee": ROOT / "data" / "coffee.png", "rocket": ROOT / "data" / "space" / "rocket.jpg"}
pytestmark = pytest.mark.e2e


class _Run:
    """What the two command-line runs left: events by clip id, float waveforms, the folder."""

    def __init__(self, root: Path):
        self.root = root
        self.result = root / "result"
        self.done: dict[str, pb.ClipDone] = {}
        self.stem: dict[str, str] = {}  # clip id -> the image's file stem (its result folder)
        self.audio: dict[str, list[bytes]] = {}
        self.gallery_after_first = ""
        self.spectrograms_after_first: dict[str, int] = {}

    def waveform(self, clip_id: str) -> np.ndarray:
        return audio_encoding.decode_payloads(self.audio[clip_id], audio_encoding.FLOAT32)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_vlm_dir, tiny_audio_dir):
    root = tmp_path_factory.mktemp("gallery")
    run = _Run(root)
    handle, settings_from = cli.Writer.handle, cli.settings_from

    def spy(self, event):
        kind = event.WhichOneof("event")
        if kind == "audio":
            assert event.audio.chunk.encoding == audio_encoding.FLOAT32
            run.audio.setdefault(event.audio.clip.clip_id, []).append(event.audio.chunk.data)
        elif kind == "clip_done":
            run.done[event.clip_done.clip.clip_id] = event.clip_done
            run.stem[event.clip_done.clip.clip_id] = Path(event.request_id).stem
        return handle(self, event)

    def float_chunks(args):
        config = settings_from(args)
        config.audio.encoding = common_pb2.AUDIO_ENCODING_FLOAT32_LE
        return config

    services = EmbeddedServices(vlm_model=str(tiny_vlm_dir), audio_model=str(tiny_audio_dir), device="cpu",
                                start_timeout_seconds=600)
    services.start()
    cwd = os.getcwd()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli.Writer, "handle", spy)
        patch.setattr(cli, "settings_from", float_chunks)
        patch.chdir(root)
        try:
            (root / "data").mkdir()
            argv = ["--orchestrator", services.target, "--no_progress", "--audio_seconds", str(SECONDS),
                    "--audio_steps", "2", "--scene_mix"]  # `make demo`'s flags, shorter clips
            shutil.copy(PHOTOS["coffee"], root / "data" / "coffee.png")
            assert cli.main(argv) == 0
            run.gallery_after_first = (run.result / "index.html").read_text()
            run.spectrograms_after_first = {str(p.relative_to(run.result)): p.stat().st_mtime_ns
                                            for p in run.result.glob("*/spectrograms/*.png")}
            shutil.copy(PHOTOS["rocket"], root / "data" / "rocket.jpg")  # a resumed run adds an image
            assert cli.main(argv) == 0
        finally:
            os.chdir(cwd)
            codes = services.stop()
    assert codes == {"vlm": 0, "audio": 0, "orchestrator": 0}
    return run


class _Gallery(HTMLParser):
    """The clips of index.html: (stem, file) -> the data-score attribute of its article."""

    def __init__(self, html: str):
        super().__init__()
        self.stem = ""
        self.scores: dict[tuple[str, str], str | None] = {}
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section" and "data-stem" in attrs:
            self.stem = attrs["data-stem"]
        elif tag == "article" and "variant" in (attrs.get("class") or "").split():
            self.scores[(self.stem, attrs["data-file"])] = attrs.get("data-score")


def manifests(run: _Run) -> dict[str, dict]:
    return {stem: json.loads((run.result / stem / "prompts.json").read_text()) for stem in PHOTOS}


def test_a_clips_score_is_one_number_in_clip_done_prompts_json_gallery_and_ranking(demo_run, tiny_audio_backend):
    run = demo_run
    variants = {cid: done for cid, done in run.done.items() if done.clip.kind == pb.CLIP_KIND_VARIANT}
    listed = manifests(run)
    assert len(variants) == sum(len(m["clips"]) for m in listed.values()) > 0
    gallery = _Gallery((run.result / "index.html").read_text()).scores
    entries = {(stem, c["file"]): c for stem, m in listed.items() for c in m["clips"]}
    assert set(gallery) == set(entries)
    for clip_id, done in variants.items():
        stem = run.stem[clip_id]
        meta = done.metadata
        assert meta.HasField("score") and meta.num_candidates == 1  # scored without candidates to rank
        entry = entries[(stem, done.clip.file_name)]
        # prompts.json and the page keep ClipDone's float32 exactly (shortest decimal that reads back to it).
        assert np.float32(entry["score"]) == np.float32(meta.score)
        assert float(gallery[(stem, done.clip.file_name)]) == entry["score"]
        # The ranking function, on the very samples the service scored, gives the same number.
        wave = run.waveform(clip_id)
        assert wave.shape == (int(SECONDS * 16000),)
        [[ranked]] = tiny_audio_backend.score_candidates([done.prompt.strip()], wave[None, None])
        assert meta.score == pytest.approx(float(ranked), abs=1e-5)
    scores = [d.metadata.score for d in variants.values()]
    assert all(-1.0 <= s <= 1.0 for s in scores) and len(set(scores)) > 1
    mixes = [d for d in run.done.values() if d.clip.kind == pb.CLIP_KIND_SCENE_MIX]
    assert len(mixes) == 2 and not any(m.metadata.HasField("score") for m in mixes)


def test_a_resumed_run_rewrites_the_gallery_with_every_image(demo_run):
    run = demo_run
    first = _Gallery(run.gallery_after_first).scores
    now = _Gallery((run.result / "index.html").read_text()).scores
    assert {stem for stem, _ in first} == {"coffee"}
    assert {stem for stem, _ in now} == {"coffee", "rocket"}
    assert set(first) < set(now)
    # The first image's spectrograms were kept, not drawn again.
    kept = run.spectrograms_after_first
    assert kept and all((run.result / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())


def test_the_gallery_in_chromium(demo_run, chromium, tmp_path):
    run = demo_run
    page = run.result / "index.html"
    chromium.get(page.as_uri())
    listed = manifests(run)
    sections = chromium.find_elements("css selector", "section.image")
    assert [s.get_attribute("data-stem") for s in sections] == sorted(listed)
    for section in sections:
        manifest = listed[section.get_attribute("data-stem")]
        assert section.find_element("css selector", ".scene").text == manifest["scene"].strip()
        assert section.find_element("css selector", ".mood").text == manifest["mood"].strip()
        assert section.find_elements("css selector", "img.picture")  # the photo was found and inlined
        rows = section.find_elements("css selector", "table.sources tbody tr")
        assert [r.get_attribute("data-file") for r in rows] == [c["file"] for c in manifest["clips"]]
        for row, clip in zip(rows, manifest["clips"]):
            assert row.find_element("css selector", ".role").text == clip["instrument"]
            assert row.find_element("css selector", ".confidence").text == str(clip.get("confidence", ""))
        cards = section.find_elements("css selector", "article.variant")
        assert len(cards) == len(manifest["clips"])
        for card, clip in zip(cards, manifest["clips"]):
            assert card.find_element("css selector", ".caption").text == clip["prompt"].strip()
            assert card.find_element("css selector", ".negative").text == clip["negative_prompt"].strip()
            assert card.find_element("css selector", ".seed").text == str(clip["seed"])
            assert card.find_element("css selector", ".steps").text.startswith(f"{clip['steps']} (")
            assert card.find_element("css selector", ".score").text == f"{clip['score']:.4f}"
            assert card.find_elements("css selector", "audio") and card.find_elements("css selector", "img.spectrogram")
        assert section.find_elements("css selector", "article.mix audio")  # the scene mix's player

    # Every player has a playable source: each loads its WAV's metadata (or reports the media error).
    players = chromium.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const audios = [...document.querySelectorAll('audio')];
        Promise.all(audios.map(a => new Promise(resolve => {
            const report = () => resolve({src: a.currentSrc, duration: a.duration, error: a.error && a.error.code});
            if (a.readyState >= 1 || a.error) return report();
            a.addEventListener('loadedmetadata', report, {once: true});
            a.addEventListener('error', report, {once: true});
            a.load();
        }))).then(done);
    """)
    clips = sum(len(m["clips"]) for m in listed.values())
    assert len(players) == clips + len(listed)  # one per clip, one per scene mix
    for player in players:
        assert player["error"] is None and player["src"].startswith("file://"), player
        assert player["duration"] == pytest.approx(SECONDS, abs=0.01), player
    # Every image (pictures and spectrograms) decoded.
    images = chromium.execute_script(
        "return [...document.images].map(i => ({src: i.src.startsWith('data:') ? i.src.slice(0, 40) : i.src,\n"
        "ok: i.complete && i.naturalWidth > 0}))")
    assert len([i for i in images if i["src"].startswith("data:image/jpeg")]) == len(listed)  # the photos
    assert len([i for i in images if "/spectrograms/" in i["src"]]) == clips + len(listed)  # clips and mixes
    assert len(images) == clips + 2 * len(listed)
    assert all(i["ok"] for i in images), [i for i in images if not i["ok"]]
    # Self-contained: nothing points off the page's folder or to the network.
    links = chromium.execute_script(
        "return [...document.querySelectorAll('[src],[href]')].map(e => e.getAttribute('src') || e.getAttribute('href'))")
    assert links and not [l for l in links if l.startswith(("http:", "https:", "//", "/", ".."))]
    assert console_errors(chromium) == []

    shot = Path(os.environ.get("I2S_GALLERY_SCREENSHOT") or tmp_path / "gallery.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert chromium.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
