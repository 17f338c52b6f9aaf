"""Export for the Phase 2 (sound-to-music) service: clips laid out by instrument role, with a manifest.

    DIR/guitar/  DIR/bass/  DIR/keyboard/  DIR/drum/     <stem>__NN_<source>_<action>.wav
    DIR/manifest.json                                   one entry per exported clip
Clips whose role is "None" have no instrument and are not exported.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from serving.atomic_files import write_text_atomic

FOLDERS = {"guitar": "guitar", "bass": "bass", "keyboard": "keyboard", "drums": "drum"}


def export_phase2(result_dir: Path, out_dir: Path) -> int:
    """Copies every finished clip under result_dir (images with a prompts.json) into out_dir by role."""
    entries = []
    for manifest_file in sorted(result_dir.glob("*/prompts.json")):
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        stem = manifest_file.parent.name
        for clip in manifest.get("clips", []):
            folder = FOLDERS.get(str(clip.get("instrument", "None")).lower())
            source_file = manifest_file.parent / clip["file"]
            if folder is None or not source_file.is_file():
                continue
            target = out_dir / folder / f"{stem}__{clip['file']}"
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".wav.part")
            shutil.copyfile(source_file, tmp)
            tmp.replace(target)
            entries.append({
                "file": str(target.relative_to(out_dir)), "instrument": folder, "image": manifest.get("image", stem),
                "source": clip.get("source", ""), "action": clip.get("action", ""), "timbre": clip.get("timbre", []),
                "prompt": clip.get("prompt", ""), "confidence": clip.get("confidence"),
                "duration_seconds": clip.get("duration_seconds"), "sample_rate_hertz": clip.get("sample_rate_hertz"),
                "seed": clip.get("seed"),
                # a loop's [start, end) samples (also in the WAV's sampler chunk, which the copy keeps)
                **({"loop_samples": clip["loop_samples"]} if "loop_samples" in clip else {}),
            })
    write_text_atomic(out_dir / "manifest.json", json.dumps({"clips": entries}, indent=2, ensure_ascii=False) + "\n")
    return len(entries)
