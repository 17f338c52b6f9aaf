"""The run's gallery: `result/index.html`, one page to look at and listen to everything under result/.

Built from what is on disk (each `result/<stem>/prompts.json`, or `prompts.partial.json` for an image with
failed clips), so a resumed run that adds clips rewrites it with every image, old and new. Self-contained:
no network, works from file://. The picture is a JPEG thumbnail inlined as a data URI (the image itself
may sit anywhere); clips and spectrograms are relative links into `result/<stem>/`.

Spectrograms (log-mel, dB) are PNGs in `result/<stem>/spectrograms/`, drawn with matplotlib (Agg) and
redrawn only when missing or older than their WAV, so rewriting the gallery costs little.
Nothing heavy is imported until a gallery is written.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from i2s_formats import boxes
from serving.atomic_files import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

GALLERY_FILE = "index.html"
SPECTROGRAM_DIR = "spectrograms"
MANIFESTS = ("prompts.json", "prompts.partial.json")  # complete image, image with failed clips
THUMBNAIL_PIXELS = 480
# Log-mel settings: 64 ms frames every 10 ms at 16 kHz, 64 mel bands (HTK) up to Nyquist, 80 dB range.
N_FFT, HOP_SECONDS, N_MELS, DB_RANGE = 1024, 0.010, 64, 80.0
FREQUENCY_TICKS_HERTZ = (0, 250, 500, 1000, 2000, 4000, 8000, 16000)


@dataclass
class ClipView:
    """One clip as the page shows it."""

    file: str
    href: str  # relative to index.html, URL-quoted
    spectrogram: str  # relative link to the PNG; "" when it could not be drawn
    entry: dict[str, Any]
    anchor: str

    @property
    def score(self) -> float | None:
        return _number(self.entry.get("score"))

    @property
    def loudness(self) -> str:
        """"-23.0 LUFS, peak -3.1 dBFS" as measured (ITU-R BS.1770); "" when the run did not record it."""
        return level_text(self.entry)

    @property
    def box(self) -> list[float] | None:
        value = self.entry.get("box")
        return list(value) if isinstance(value, list) and boxes.box_error(value) is None else None


def _number(value: Any) -> float | None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if number and math.isfinite(value) else None


def level_text(entry: Any) -> str:
    if not isinstance(entry, dict) or "loudness_lufs" not in entry:
        return ""
    lufs, peak = _number(entry.get("loudness_lufs")), _number(entry.get("peak_dbfs"))
    text = f"{lufs:.1f} LUFS" if lufs is not None else "silent"
    return text + (f", peak {peak:.1f} dBFS" if peak is not None else "")


@dataclass
class ImageView:
    """One image: its manifest and clips."""

    stem: str
    manifest: dict[str, Any]
    complete: bool
    picture: str = ""  # data URI of the thumbnail; "" when the image is not found
    clips: list[ClipView] = field(default_factory=list)
    sources: list[tuple[str, list[ClipView]]] = field(default_factory=list)  # clips grouped by source, in order
    mix: ClipView | None = None

    @property
    def boxes(self) -> list[tuple[str, list[float]]]:
        """(source name, box) of every located source, once each: drawn over the picture."""
        seen: dict[str, list[float]] = {}
        for clip in self.clips:
            if clip.box is not None:
                seen.setdefault(str(clip.entry.get("source", "")), clip.box)
        return list(seen.items())

    @property
    def mix_loudness(self) -> str:
        return level_text(self.manifest.get("scene_mix_level"))

    @property
    def mix_data(self) -> str:
        """Link to the mix's mix.json, when the run wrote one."""
        name = self.manifest.get("scene_mix_data")
        return _href(Path(self.stem) / name) if isinstance(name, str) and Path(name).name == name else ""


def write_gallery(result_dir: str | Path) -> Path | None:
    """Writes result_dir/index.html for every image folder with a manifest; None when there is none."""
    result_dir = Path(result_dir)
    folders = sorted({m.parent for name in MANIFESTS for m in result_dir.glob(f"*/{name}")})
    painter = _Lazy(SpectrogramPainter)
    images = [view for view in (_image_view(result_dir, folder, painter) for folder in folders) if view is not None]
    if not images:
        return None
    html = _template().render(
        images=images, generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        clips=sum(len(i.clips) for i in images), n_mels=N_MELS, db_range=DB_RANGE,
    )
    return write_text_atomic(result_dir / GALLERY_FILE, html)


def _image_view(result_dir: Path, folder: Path, painter: "_Lazy") -> ImageView | None:
    manifest_file = next((folder / n for n in MANIFESTS if (folder / n).is_file()), None)
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as exc:
        log.warning("gallery: %s skipped: %s", manifest_file, exc)
        return None
    view = ImageView(stem=folder.name, manifest=manifest, complete=manifest_file.name == MANIFESTS[0])
    view.picture = _thumbnail(manifest.get("image"))
    wanted = set()
    for entry in manifest.get("clips") or []:
        clip = _clip_view(result_dir, folder, entry, painter) if isinstance(entry, dict) else None
        if clip is not None:
            view.clips.append(clip)
            wanted.add(clip.file)
    groups: dict[str, list[ClipView]] = {}
    for clip in view.clips:
        groups.setdefault(str(clip.entry.get("source", "")), []).append(clip)
    view.sources = list(groups.items())
    mix = manifest.get("scene_mix")
    if isinstance(mix, str):
        view.mix = _clip_view(result_dir, folder, {"file": mix}, painter)
        if view.mix is not None:
            wanted.add(view.mix.file)
    for stale in (folder / SPECTROGRAM_DIR).glob("*.png"):  # of clips an earlier run made and this one replaced
        if stale.stem + ".wav" not in wanted:
            stale.unlink(missing_ok=True)
    return view


def _clip_view(result_dir: Path, folder: Path, entry: dict[str, Any], painter: "_Lazy") -> ClipView | None:
    name = entry.get("file")
    # Only a plain file name inside the image's folder: the manifest is data, not a path to follow.
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".wav"):
        return None
    wav = folder / name
    if not wav.is_file():
        return None
    try:
        png = _spectrogram(wav, painter)
        spectrogram = _href(png.relative_to(result_dir))
    except Exception as exc:  # noqa: BLE001 - a clip we cannot draw keeps its player and its row
        log.warning("gallery: no spectrogram for %s: %s", wav, exc)
        spectrogram = ""
    return ClipView(file=name, href=_href(wav.relative_to(result_dir)), spectrogram=spectrogram, entry=entry,
                    anchor=f"{folder.name}/{wav.stem}")


class SpectrogramDrawer:
    """Draws each clip's spectrogram as soon as the clip is written, on a thread of its own at a low CPU
    priority (the services come first; it uses what they leave idle), so the gallery at the end of a run
    finds them drawn instead of drawing them all then. ``close`` waits for the ones still queued."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._painter = _Lazy(SpectrogramPainter)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="spectrograms", initializer=_lower_priority)

    def submit(self, wav: Path) -> None:
        self._pool.submit(self._draw, Path(wav))

    def _draw(self, wav: Path) -> None:
        try:
            _spectrogram(wav, self._painter)
        except Exception as exc:  # noqa: BLE001 - the gallery tries again, and says why if it fails too
            log.debug("spectrogram of %s not drawn yet: %s", wav, exc)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _lower_priority() -> None:
    """This thread only (Linux schedules threads one by one): nice 10. Elsewhere it stays as it is."""
    import os
    import threading

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


def _spectrogram(wav: Path, painter: "_Lazy") -> Path:
    """The clip's spectrogram PNG, drawn unless it exists and is newer than the WAV."""
    png = wav.parent / SPECTROGRAM_DIR / (wav.stem + ".png")
    if not png.is_file() or png.stat().st_mtime < wav.stat().st_mtime:
        painter().draw(wav, png)
    return png


class _Lazy:
    """Makes the object on the first call only: a gallery whose spectrograms all exist imports no matplotlib."""

    def __init__(self, factory):
        self.factory, self.value = factory, None

    def __call__(self):
        if self.value is None:
            self.value = self.factory()
        return self.value


def _href(relative: Path) -> str:
    return "/".join(quote(part) for part in relative.parts)


def _thumbnail(image: Any) -> str:
    """The picture as a JPEG data URI, at most THUMBNAIL_PIXELS on a side; "" if it cannot be read."""
    if not isinstance(image, str) or not image:
        return ""
    from PIL import Image, ImageOps

    try:
        with Image.open(image) as picture:
            picture = ImageOps.exif_transpose(picture)
            picture.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
            buffer = io.BytesIO()
            picture.convert("RGB").save(buffer, format="JPEG", quality=85)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        log.info("gallery: no picture for %s: %s", image, exc)
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def log_mel(waveform: np.ndarray, sample_rate: int) -> np.ndarray:
    """Log-mel power in dB (N_MELS bands, HTK mel scale up to Nyquist; DB_RANGE below the peak), (N_MELS, frames).

    In numpy (centred frames, reflect padding, periodic Hann window, triangular filters): importing an audio
    library for it cost more than drawing every spectrogram of a run (transformers' import alone ~1.4 s)."""
    waveform = np.asarray(waveform, np.float64)
    n_fft = min(N_FFT, 1 << max(int(len(waveform)).bit_length() - 1, 4))  # a clip shorter than one frame
    hop = max(1, int(HOP_SECONDS * sample_rate))
    padded = np.pad(waveform, n_fft // 2, mode="reflect" if len(waveform) > n_fft // 2 else "constant")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2  # (frames, n_fft // 2 + 1)
    mel = np.maximum(1e-10, _mel_filters(n_fft, sample_rate).T @ power.T)  # (N_MELS, frames)
    db = 10.0 * np.log10(mel)
    return np.maximum(db, db.max() - DB_RANGE)


def _mel_filters(n_fft: int, sample_rate: int) -> np.ndarray:
    """(n_fft // 2 + 1, N_MELS) triangles, evenly spaced on the HTK mel scale from 0 Hz to Nyquist."""
    edges_mel = np.linspace(0.0, _mel(sample_rate / 2), N_MELS + 2)
    edges = 700.0 * (10.0 ** (edges_mel / 2595.0) - 1.0)
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    slopes = edges[None, :] - bins[:, None]
    widths = np.diff(edges)
    rising, falling = -slopes[:, :-2] / widths[:-1], slopes[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(rising, falling))


def _mel(hertz: float) -> float:
    return 2595.0 * math.log10(1.0 + hertz / 700.0)  # HTK, as the filter bank above


class SpectrogramPainter:
    """Draws log-mel spectrograms to PNG: time in s, frequency in Hz on the mel scale, colour in dB below the
    clip's peak. One figure is laid out once and reused for every clip (a fixed layout: matplotlib's
    constrained layout took ~60 % of the time per clip). Axes, ticks and colour bar are drawn once per clip
    length and kept as a background; each clip then draws only its image over it (blitting: the axes' ticks
    took ~85 % of a full redraw)."""

    def __init__(self):
        import matplotlib

        matplotlib.use("Agg")  # no display; set before anything draws
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4.8, 2.2), dpi=100)
        FigureCanvasAgg(self.figure)  # an Agg canvas of its own: blitting needs one
        self.axes = self.figure.add_axes((0.12, 0.2, 0.72, 0.74))
        self.image = self.axes.imshow(np.zeros((N_MELS, 2)), origin="lower", aspect="auto", cmap="magma",
                                      interpolation="nearest", vmin=-DB_RANGE, vmax=0.0)
        self.axes.set_xlabel("time (s)", fontsize=8)
        self.axes.set_ylabel("frequency (Hz, mel)", fontsize=8)
        self.axes.tick_params(labelsize=7)
        bar = self.figure.colorbar(self.image, cax=self.figure.add_axes((0.86, 0.2, 0.025, 0.74)))
        bar.set_label("dB re peak", fontsize=8)
        bar.ax.tick_params(labelsize=7)
        self._backgrounds: dict[tuple[int, int], Any] = {}  # (samples, rate) -> the figure drawn without the image

    def _background(self, samples: int, rate: int):
        key = (samples, rate)
        if key not in self._backgrounds:
            ticks = [f for f in FREQUENCY_TICKS_HERTZ if f <= rate / 2]
            self.axes.set_yticks([_mel(f) for f in ticks], [f"{f // 1000}k" if f >= 1000 else str(f) for f in ticks])
            self.image.set_extent((0.0, samples / rate, 0.0, _mel(rate / 2)))
            hidden = [self.image, *self.axes.spines.values()]  # drawn per clip, in a full draw's order
            for artist in hidden:
                artist.set_visible(False)
            self.figure.canvas.draw()
            for artist in hidden:
                artist.set_visible(True)
            self._backgrounds[key] = self.figure.canvas.copy_from_bbox(self.figure.bbox)
        return self._backgrounds[key]

    def draw(self, wav: Path, png: Path) -> Path:
        import soundfile as sf
        from PIL import Image

        audio, rate = sf.read(wav, dtype="float32", always_2d=True)
        power = log_mel(audio.mean(axis=1), rate)
        canvas = self.figure.canvas
        canvas.restore_region(self._background(len(audio), rate))
        self.image.set_extent((0.0, len(audio) / rate, 0.0, _mel(rate / 2)))
        self.image.set_data(power - power.max())
        self.axes.draw_artist(self.image)
        for spine in self.axes.spines.values():  # the frame goes over the image, as in a full draw
            self.axes.draw_artist(spine)
        with atomic_path(png) as tmp:
            Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw", "RGBA", 0, 1).save(
                tmp, format="PNG")
        return png


def _template():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(loader=FileSystemLoader(Path(__file__).with_name("templates")),
                      autoescape=select_autoescape(["html"]), undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    return env.get_template("gallery.html")
