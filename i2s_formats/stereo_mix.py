"""The stereo scene mix: mono stems placed by where their source is, summed, brought to a loudness target.

- Pan from the box centre's x (pan = 2·cx − 1), constant-power law: left = cos((pan+1)·π/4),
  right = sin((pan+1)·π/4), so left² + right² = 1 wherever the source sits.
- Gain from the box's size: ±SIZE_GAIN_DB over the box's linear size √area (a larger, nearer source is
  louder), after every stem is first matched to one reference loudness (BS.1770), so the size decides.
- Ambience (no box, or a box over WIDE_AREA of the picture or more): spread wide with complementary comb
  filters at pan 0: left ∝ (x + x[n−d])/√2, right ∝ (x − x[n−d])/√2. Left and right are decorrelated
  (not a centred mono copy) and their summed power is, on average, the stem's.
- The sum is brought to the target loudness by one master gain, lowered where the peak would pass the
  ceiling: it never clips.

The mix is described by data (`SceneMix`, written as mix.json by the command line) from which
:func:`render` rebuilds it sample for sample from the stem files. Stems go in as their PCM 16-bit files
hold them (:func:`as_saved`), so the rebuild from files is exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from i2s_formats import audio_encoding, boxes, loudness
from image_to_sound.v1 import common_pb2, orchestrator_pb2 as pb

SIZE_GAIN_DB = 6.0  # the size gain's bound, each way
WIDE_AREA = 0.6  # a box covering this share of the picture or more is ambience
WIDE_DELAY_SECONDS = 0.011  # comb delay of a wide stem: decorrelates without an audible echo
REFERENCE_LUFS = -23.0  # stems are matched to this before the size gain
MAX_MATCH_DB = 30.0  # a near-silent stem is not blown up by more than this
MIX_FORMAT = "i2s-scene-mix"
MIX_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Placement:
    pan: float  # -1 left .. 1 right
    size_gain_db: float
    wide: bool


def place(location: common_pb2.BoundingBox | None) -> Placement:
    """Where a source goes in the stereo field, from its normalised box (None: no box)."""
    if location is None:
        return Placement(0.0, 0.0, True)
    width, height = location.x_max - location.x_min, location.y_max - location.y_min
    area = max(0.0, width) * max(0.0, height)
    if area >= WIDE_AREA:
        return Placement(0.0, 0.0, True)
    centre = (location.x_min + location.x_max) / 2.0
    pan = min(1.0, max(-1.0, 2.0 * centre - 1.0))
    size = math.sqrt(area)  # linear size 0..1; the box's share of the picture's side
    return Placement(pan, SIZE_GAIN_DB * (2.0 * min(1.0, size / math.sqrt(WIDE_AREA)) - 1.0), False)


def pan_gains(pan: float) -> tuple[float, float]:
    """Constant-power left and right gains for a pan in [-1, 1]."""
    angle = (pan + 1.0) * math.pi / 4.0
    return math.cos(angle), math.sin(angle)


def as_saved(samples: np.ndarray) -> np.ndarray:
    """Samples as a PCM 16-bit file (and stream) holds them, read back as floats."""
    return np.frombuffer(audio_encoding.to_pcm16(samples), dtype="<i2").astype(np.float64) / 32767.0


def place_stem(samples: np.ndarray, stem: pb.MixStem) -> np.ndarray:
    """One mono stem as (frames, 2): gain, then pan or the wide comb pair."""
    x = np.asarray(samples, dtype=np.float64) * 10.0 ** (stem.gain_db / 20.0)
    left_gain, right_gain = pan_gains(stem.pan)
    d = stem.wide_delay_samples
    if d:
        delayed = np.zeros_like(x)
        delayed[d:] = x[: len(x) - d] if d < len(x) else 0.0
        left, right = (x + delayed) / math.sqrt(2.0), (x - delayed) / math.sqrt(2.0)
    else:
        left, right = x, x
    return np.stack([left * left_gain, right * right_gain], axis=1)


def render(mix: pb.SceneMix, stems: Mapping[str, tuple[np.ndarray, int]]) -> np.ndarray:
    """The stereo mix (frames, 2) float32 that ``mix`` describes, from each stem's (samples, rate) by clip
    id; stems at another rate are resampled to the mix's (soxr)."""
    return _master(_sum(mix, stems), mix.gain_db)


def _master(summed: np.ndarray, gain_db: float) -> np.ndarray:
    return (summed * 10.0 ** (gain_db / 20.0)).astype(np.float32)


def _sum(mix: pb.SceneMix, stems: Mapping[str, tuple[np.ndarray, int]]) -> np.ndarray:
    """The placed stems summed, before the master gain (float64)."""
    placed = []
    for stem in mix.stems:
        samples, rate = stems[stem.clip_id]
        samples = loudness.resample(np.asarray(samples, dtype=np.float32), rate, mix.sample_rate_hertz) \
            if rate != mix.sample_rate_hertz else samples
        placed.append((int(stem.start_samples), place_stem(samples, stem)))
    length = max((start + len(p) for start, p in placed), default=0)
    out = np.zeros((length, 2), dtype=np.float64)
    for start, p in placed:
        out[start: start + len(p)] += p
    return out


@dataclass(frozen=True)
class StemIn:
    """A finished variant clip going into the mix."""

    clip_id: str
    file_name: str
    samples: np.ndarray
    rate: int
    location: common_pb2.BoundingBox | None = None


def mix_stems(stems: Sequence[StemIn], target_lufs: float = loudness.MIX_TARGET_LUFS,
              ceiling_dbfs: float = loudness.PEAK_CEILING_DBFS) -> tuple[np.ndarray, pb.SceneMix]:
    """Places and sums ``stems`` (at the highest rate among them) and brings the sum to ``target_lufs``
    under ``ceiling_dbfs``. Returns the stereo mix (frames, 2) float32 and the data that rebuilds it."""
    if not stems:
        raise ValueError("no clips to mix")
    if any(s.rate <= 0 for s in stems):
        raise ValueError("every clip needs a positive sample rate")
    rate = max(s.rate for s in stems)
    mix = pb.SceneMix(sample_rate_hertz=rate, target_lufs=target_lufs, peak_ceiling_dbfs=ceiling_dbfs)
    inputs: dict[str, tuple[np.ndarray, int]] = {}
    for s in stems:
        saved = as_saved(s.samples)
        inputs[s.clip_id] = (saved, s.rate)
        at_rate = loudness.resample(saved, s.rate, rate) if s.rate != rate else saved
        level = loudness.measure(at_rate, rate)
        match = 0.0 if level.lufs is None else min(MAX_MATCH_DB, max(-MAX_MATCH_DB, REFERENCE_LUFS - level.lufs))
        where = place(s.location)
        mix.stems.append(pb.MixStem(
            clip_id=s.clip_id, file_name=s.file_name, pan=where.pan, gain_db=match + where.size_gain_db,
            size_gain_db=where.size_gain_db, start_samples=0,
            wide_delay_samples=int(round(WIDE_DELAY_SECONDS * rate)) if where.wide else 0))
    summed = _sum(mix, inputs)
    mix.gain_db = loudness.gain_to_target(loudness.measure(summed, rate), target_lufs, ceiling_dbfs)
    return _master(summed, mix.gain_db), mix  # exactly what render(mix, inputs) computes


# -- mix.json ---------------------------------------------------------------------------------------


def to_json(mix: pb.SceneMix, file_name: str, level: loudness.Level | None = None,
            locations: Mapping[str, common_pb2.BoundingBox | None] | None = None) -> dict:
    """mix.json (schema: i2s_formats/schemas/mix.schema.json)."""
    locations = locations or {}
    return {
        "format": MIX_FORMAT,
        "version": MIX_FORMAT_VERSION,
        "file": file_name,
        "channels": 2,
        "sample_rate_hertz": mix.sample_rate_hertz,
        "gain_db": mix.gain_db,
        "target_lufs": mix.target_lufs,
        "peak_ceiling_dbfs": mix.peak_ceiling_dbfs,
        "loudness_lufs": None if level is None else level.lufs,
        "peak_dbfs": None if level is None else level.peak_dbfs,
        "pan_law": "constant power: left = cos((pan+1)*pi/4), right = sin((pan+1)*pi/4)",
        "wide": "complementary combs: left = (x + x[n-d])/sqrt(2), right = (x - x[n-d])/sqrt(2), then the pan gains",
        "stems": [
            {
                "clip_id": s.clip_id,
                "file": s.file_name,
                "pan": s.pan,
                "gain_db": s.gain_db,
                "size_gain_db": s.size_gain_db,
                "start_samples": s.start_samples,
                "wide_delay_samples": s.wide_delay_samples,
                "box": boxes.to_list(locations[s.clip_id]) if locations.get(s.clip_id) is not None else None,
            }
            for s in mix.stems
        ],
    }


def from_json(data: Mapping) -> pb.SceneMix:
    """The SceneMix a mix.json describes (validate it against its schema first)."""
    mix = pb.SceneMix(sample_rate_hertz=data["sample_rate_hertz"], gain_db=data["gain_db"],
                      target_lufs=data["target_lufs"], peak_ceiling_dbfs=data["peak_ceiling_dbfs"])
    for s in data["stems"]:
        mix.stems.append(pb.MixStem(clip_id=s["clip_id"], file_name=s["file"], pan=s["pan"], gain_db=s["gain_db"],
                                    size_gain_db=s["size_gain_db"], start_samples=s["start_samples"],
                                    wide_delay_samples=s["wide_delay_samples"]))
    return mix
