"""i2s_formats.loudness.StreamResampler: a clip resampled as it arrives, in pieces of any sizes, is exactly
the clip resampled whole (what lets a long clip at 44.1 / 48 kHz stream window by window)."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from i2s_formats.loudness import StreamResampler, resample

CLIP = np.random.default_rng(5).uniform(-0.5, 0.5, 16000 * 3).astype(np.float32)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=20000), max_size=8), st.sampled_from([16000, 44100, 48000]))
def test_pieces_of_any_sizes_resample_to_the_whole_clip_resampled(cuts, rate):
    bounds = sorted({min(c, len(CLIP)) for c in cuts} | {0, len(CLIP)})
    resampler = StreamResampler(16000, rate)
    out = [resampler.add(CLIP[a:b]) for a, b in zip(bounds, bounds[1:])] + [resampler.finish()]
    np.testing.assert_array_equal(np.concatenate(out), resample(CLIP, 16000, rate))
