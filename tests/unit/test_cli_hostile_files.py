"""main.py --skip_vlm over hostile description files (real orchestrator, fake model services): each bad
file fails its own image with a clear message, the good ones are rendered, nothing lands outside result/."""
import asyncio
import json
import shutil
from pathlib import Path

from i2s_cli import cli
from tests.fake_services import fake_stack

BOUND = 120
ROOT = Path(__file__).resolve().parents[2]


async def test_hostile_description_files_fail_alone(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    sources = tmp_path / "sound_sources"
    files = {
        "latin1": "caf\xe9".encode("latin-1"),
        "nested": b"[" * 100_000,
        "huge": b'{"sound_sources": [' + b'{"name": "bell", "variants": ["rings"]},' * 40_000 + b"{}]}",
        "many": json.dumps({"sound_sources": [{"name": "bell", "variants": ["rings"]}] * 10_000}).encode(),
        "good": json.dumps({"scene_description": "a yard", "sound_sources": [
            {"name": "../../etc/passwd", "variants": [{"play_method": "creaking\x00\nINFO forged"}]},
            {"name": "CON", "variants": ["humming"]}]}).encode(),
    }
    (tmp_path / "data").mkdir()
    for stem, content in files.items():
        shutil.copy(ROOT / "data" / "coffee.png", tmp_path / "data" / f"{stem}.png")
        (sources / stem).mkdir(parents=True)
        (sources / stem / f"{stem}_sound_source.json").write_bytes(content)
    argv = ["--orchestrator", "", "--no_progress", "--audio_seconds", "1", "--skip_vlm"]
    async with fake_stack() as (target, _, _):
        argv[1] = target
        code = await asyncio.wait_for(asyncio.to_thread(cli.main, argv), BOUND)
    assert code == 1  # some images failed
    assert sorted(p.name for p in (tmp_path / "result" / "good").glob("*.wav")) == [
        "01_etc_passwd_creaking_info_forged.wav", "02_con_humming.wav"]
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*") if p.is_file()}
    assert written <= {"data", "sound_sources", "result"}
    assert not (tmp_path / "result" / "many").exists() or not list((tmp_path / "result" / "many").glob("*.wav"))
    log = capfd.readouterr().err  # the command line logs to stderr
    assert "not UTF-8" in log and "nested too deeply" in log and "larger than" in log and "at most 64" in log
    assert max(len(line) for line in log.splitlines()) < 2000
