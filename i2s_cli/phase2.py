"""Export for the Phase 2 (sound-to-music) service: stems laid out by instrument role, the scene mixes that
can be rebuilt from them, and a manifest checked against its JSON Schema before it is written.

    DIR/guitar/  DIR/bass/  DIR/keyboard/  DIR/drum/     <stem>__NN_<source>_<action>.wav
    DIR/mix/<stem>/                                     mix.json, scene_mix.wav and every stem it names
    DIR/manifest.json                                   one entry per exported clip and per mix
                                                        (schema: i2s_formats/schemas/phase2_manifest.schema.json)
Clips whose role is "None" have no instrument and are not exported by role (a mix still holds them).
Per clip: instrument, source, action, box, pan and gain (from the box: where the scene mix puts it),
loudness, peak, rate, seed, caption.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from i2s_formats import boxes, json_schemas, stereo_mix
from serving.atomic_files import write_text_atomic

FOLDERS = {"guitar": "guitar", "bass": "bass", "keyboard": "keyboard", "drums": "drum"}
FORMAT, VERSION = "i2s-phase2-export", 2


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    shutil.copyfile(source, tmp)
    tmp.replace(target)


def _placement(clip: dict, mix_stems: dict[str, dict]) -> dict:
    """Pan and gain of a clip: as its image's scene mix placed it, else as the box alone places it."""
    stem = mix_stems.get(clip.get("clip_id", ""))
    if stem is not None:
        return {"pan": stem["pan"], "gain_db": stem["size_gain_db"], "wide": stem["wide_delay_samples"] > 0}
    where = stereo_mix.place(boxes.location_from_file(clip.get("box")))  # a malformed box: placed as no box
    return {"pan": where.pan, "gain_db": where.size_gain_db, "wide": where.wide}


def _mix_of(image_dir: Path) -> dict | None:
    path = image_dir / "mix.json"
    if not path.is_file():
        return None
    document = json.loads(path.read_text(encoding="utf-8"))
    json_schemas.validate(document, json_schemas.MIX)
    return document


def export_phase2(result_dir: Path, out_dir: Path) -> int:
    """Copies every finished clip under result_dir (images with a prompts.json) into out_dir by role, each
    image's scene mix with its stems into out_dir/mix/<stem>/, and writes the manifest once it validates.
    Returns the number of clips exported by role. Raises json_schemas.SchemaError (naming the field) and
    writes no manifest when an entry does not match the schema."""
    entries, mixes = [], []
    for manifest_file in sorted(result_dir.glob("*/prompts.json")):
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        image_dir, stem = manifest_file.parent, manifest_file.parent.name
        mix = _mix_of(image_dir)
        mix_stems = {s["clip_id"]: s for s in mix["stems"]} if mix else {}
        for clip in manifest.get("clips", []):
            folder = FOLDERS.get(str(clip.get("instrument", "None")).lower())
            source_file = image_dir / clip["file"]
            if folder is None or not source_file.is_file():
                continue
            target = out_dir / folder / f"{stem}__{clip['file']}"
            _copy(source_file, target)
            entries.append({
                "file": str(target.relative_to(out_dir)), "instrument": folder, "image": manifest.get("image", stem),
                "source": clip.get("source", ""), "action": clip.get("action", ""), "timbre": clip.get("timbre", []),
                "prompt": clip.get("prompt", ""), "confidence": clip.get("confidence"), "box": clip.get("box"),
                **_placement(clip, mix_stems),
                "loudness_lufs": clip.get("loudness_lufs"), "peak_dbfs": clip.get("peak_dbfs"),
                "duration_seconds": clip.get("duration_seconds"), "sample_rate_hertz": clip.get("sample_rate_hertz"),
                "seed": clip.get("seed"),
                # a loop's [start, end) samples (also in the WAV's sampler chunk, which the copy keeps)
                **({"loop_samples": clip["loop_samples"]} if "loop_samples" in clip else {}),
            })
        if mix is not None and all((image_dir / name).is_file() for name in [mix["file"], *mix_stems_files(mix)]):
            folder = out_dir / "mix" / stem
            for name in [mix["file"], *mix_stems_files(mix)]:
                _copy(image_dir / name, folder / name)
            write_text_atomic(folder / "mix.json", json.dumps(mix, indent=2) + "\n")
            mixes.append({"image": manifest.get("image", stem), "mix": str((folder / "mix.json").relative_to(out_dir)),
                          "file": str((folder / mix["file"]).relative_to(out_dir)),
                          "loudness_lufs": mix["loudness_lufs"], "peak_dbfs": mix["peak_dbfs"]})
    document = {"format": FORMAT, "version": VERSION, "clips": entries, "mixes": mixes}
    json_schemas.validate(document, json_schemas.PHASE2_MANIFEST)  # before writing: a broken one is never handed on
    write_text_atomic(out_dir / "manifest.json", json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    return len(entries)


def mix_stems_files(mix: dict) -> list[str]:
    return [s["file"] for s in mix["stems"]]
