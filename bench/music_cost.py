"""python -m bench.music_cost [--clips 6] [--seconds 4] [--repeat 5] [--audio-dir TINY_AUDIOLDM2]

What the material for music costs per image, on the host CPU: loudness measured on every clip (the audio
service) and on the mix, resampling every clip to 48 kHz (soxr), normalising every clip to a target, and
the stereo placement and mix (the orchestrator; it measures every stem and the sum). Printed next to the
audio time per image: the documented H100 figures (docs/performance.md), and with --audio-dir the time this
machine takes to generate the same clips with that checkpoint (e.g. the tiny one), so both sides of the ratio
come from one machine. A figure to read, not a timed test: nothing asserts on it.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

# docs/performance.md: AudioLDM2 base fp16 DPM 20 on an H100, seconds per clip (batch 1 compiled, eager, batch 4)
H100_SECONDS_PER_CLIP = {"compiled, batch 1": 0.35, "eager, batch 1": 1.6, "batch of 4": 0.44}


def _median_seconds(fn, repeat: int) -> float:
    fn()  # first call: imports (pyloudnorm, scipy, soxr) and filter design, not counted
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def post_processing(clips: int, seconds: float, repeat: int, rate: int = 16000) -> dict[str, float]:
    from i2s_formats import loudness, stereo_mix
    from image_to_sound.v1 import common_pb2

    rng = np.random.default_rng(0)
    waves = [(rng.standard_normal(int(seconds * rate)) * 0.1).astype(np.float32) for _ in range(clips)]
    located = [common_pb2.BoundingBox(x_min=i / clips, y_min=0.2, x_max=(i + 0.8) / clips, y_max=0.7)
               for i in range(clips)]
    stems = [stereo_mix.StemIn(f"c{i}", f"{i}.wav", w, rate, located[i] if i % 3 else None)
             for i, w in enumerate(waves)]
    return {
        "loudness, every clip": _median_seconds(lambda: [loudness.measure(w, rate) for w in waves], repeat),
        "resample to 48 kHz, every clip": _median_seconds(
            lambda: [loudness.resample(w, rate, 48000) for w in waves], repeat),
        "normalise to -23 LUFS, every clip": _median_seconds(
            lambda: [loudness.normalise(w, rate, -23.0) for w in waves], repeat),
        "placement + stereo mix + its loudness": _median_seconds(lambda: stereo_mix.mix_stems(stems), repeat),
        "all of it at 48 kHz (deliver each clip, then mix)": _median_seconds(
            lambda: stereo_mix.mix_stems([stereo_mix.StemIn(s.clip_id, s.file_name, loudness.deliver(
                s.samples, rate, 48000, -23.0).samples, 48000, s.location) for s in stems]), repeat),
    }


def audio_time(audio_dir: str, clips: int, seconds: float) -> float:
    """Seconds to generate `clips` clips one after another with the checkpoint at audio_dir, on CPU."""
    from audio_service.diffusers_backend import DiffusersAudioBackend
    from i2s_formats.contract import AudioRequest

    backend = DiffusersAudioBackend(audio_dir, device="cpu")
    backend.load()
    request = lambda i: AudioRequest(prompt=f"rain on a tin roof {i}", duration_seconds=seconds, seed=i)  # noqa: E731
    backend.generate([request(0)])  # warm
    start = time.perf_counter()
    for i in range(clips):
        backend.generate([request(i + 1)])
    elapsed = time.perf_counter() - start
    backend.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.music_cost", description=__doc__.split("\n\n")[1])
    parser.add_argument("--clips", type=int, default=6, help="clips per image (default 6)")
    parser.add_argument("--seconds", type=float, default=4.0, help="clip length (default 4, the seed's)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure; the median is printed")
    parser.add_argument("--audio-dir", help="an AudioLDM2 checkpoint to time generation with on this machine")
    args = parser.parse_args()
    costs = post_processing(args.clips, args.seconds, args.repeat)
    print(f"per image: {args.clips} clips of {args.seconds:g} s at 16 kHz (median of {args.repeat}, this CPU)")
    for name, value in costs.items():
        print(f"  {name:<52} {value * 1000:8.1f} ms")
    print("audio time per image, for comparison:")
    for name, per_clip in H100_SECONDS_PER_CLIP.items():
        print(f"  H100, AudioLDM2 base DPM 20 ({name}, docs/performance.md) {per_clip * args.clips * 1000:8.0f} ms")
    if args.audio_dir:
        print(f"  this machine, {args.audio_dir}, DPM 20, one at a time   "
              f"{audio_time(args.audio_dir, args.clips, args.seconds) * 1000:8.0f} ms")


if __name__ == "__main__":
    main()
