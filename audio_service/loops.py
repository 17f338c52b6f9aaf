"""Seamless loops: a clip whose end flows into its start, at a loop point chosen by the signal.

The clip is generated `extra_samples` longer than asked. Its loop starts `fade` samples in, at an upward
zero crossing (`s`); what came before `s` is kept aside. The loop ends at `e`, chosen within the last
`search` samples of the asked length at an upward zero crossing where the audio before `e` is most like
the audio before `s` (normalised correlation over the fade). The loop is x[s:e] with its last `fade`
samples crossfaded into x[s-fade:s]: at the wrap, the last sample played is (almost only) x[s-1] and the
next is x[s], a pair that was adjacent in the generated audio, so the seam is as smooth as the clip itself.
The loop is `e - s` samples: the asked length, or up to `search` (10 ms) less.

Everything but the last `fade + search` samples streams as it is made (`LoopSeam.add`); the start is
decided from the first piece. Latent-space bridges (in-painting between the end and the start) are not
done: the signal-chosen point is what the issue allows where the bridge is not built.
"""
from __future__ import annotations

import numpy as np

from audio_service.long_clips import crossfade

__all__ = ["FADE_SECONDS", "SEARCH_SECONDS", "LoopSeam", "build_loop"]

FADE_SECONDS = 0.5  # at most a quarter of the loop
SEARCH_SECONDS = 0.01


def _upward_crossings(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Indices i in [lo, hi) with x[i-1] < 0 <= x[i]."""
    lo = max(lo, 1)
    if hi <= lo:
        return np.zeros(0, dtype=np.int64)
    seg = x[lo - 1 : hi]
    return lo + np.nonzero((seg[:-1] < 0) & (seg[1:] >= 0))[0]


class LoopSeam:
    """Turns the generated samples, fed in order, into the loop: `add` returns what can go out now,
    `finish` the rest (the crossfaded tail). `loop_points` = (0, loop length) once finished."""

    def __init__(self, total_samples: int, sample_rate: int):
        self.total = int(total_samples)
        self.fade = max(1, min(int(round(FADE_SECONDS * sample_rate)), self.total // 4))
        self.search = max(1, min(int(round(SEARCH_SECONDS * sample_rate)), self.total // 8))
        self.start: int | None = None  # s, in generated samples
        self._head: np.ndarray | None = None  # x[s-fade:s]
        self._buffer = np.zeros(0, np.float32)  # generated samples not yet sent (from _buffer_at on)
        self._buffer_at = 0
        self._received = 0
        self.loop_points: tuple[int, int] | None = None

    @property
    def extra_samples(self) -> int:
        """Generate this many samples more than the clip's length."""
        return self.fade + self.search

    def _free_until(self) -> int:
        """Generated samples before this index are final (the tail starts at e - fade >= this)."""
        assert self.start is not None
        return self.start + self.total - self.search - self.fade

    def add(self, piece: np.ndarray) -> np.ndarray:
        self._buffer = np.concatenate([self._buffer, np.asarray(piece, dtype=np.float32)])
        self._received += len(piece)
        if self.start is None:
            if self._received < self.fade + self.search:
                return np.zeros(0, np.float32)
            x = self._buffer
            crossings = _upward_crossings(x, self.fade, self.fade + self.search)
            self.start = int(crossings[0]) if len(crossings) else self.fade
            self._head = x[self.start - self.fade : self.start].copy()
            self._buffer, self._buffer_at = x[self.start :], self.start
        ready = max(0, self._free_until() - self._buffer_at)
        out, self._buffer = self._buffer[:ready], self._buffer[ready:]
        self._buffer_at += len(out)
        return out

    def finish(self) -> np.ndarray:
        if self.start is None or self._received < self.total + self.extra_samples:
            raise ValueError(f"a loop needs {self.total + self.extra_samples} generated samples, got {self._received}")
        s, fade, head = self.start, self.fade, self._head
        lo, hi = s + self.total - self.search, s + self.total + 1  # candidate ends e
        candidates = _upward_crossings(self._x_view(lo - 1, hi), 1, hi - lo + 1) + lo - 1
        if len(candidates) == 0:
            candidates = np.arange(lo, hi)
        best, best_score = int(candidates[-1]), -np.inf
        for e in candidates:
            tail = self._x_view(e - fade, e)
            denom = float(np.linalg.norm(tail) * np.linalg.norm(head))
            score = float(np.dot(tail, head) / denom) if denom > 0 else 0.0
            if score > best_score:
                best, best_score = int(e), score
        body = self._x_view(self._buffer_at, best - fade)
        tail = crossfade(self._x_view(best - fade, best), head)
        self.loop_points = (0, best - s)
        return np.concatenate([body, tail]).astype(np.float32)

    def _x_view(self, a: int, b: int) -> np.ndarray:
        """Generated samples [a, b) from the held buffer."""
        return self._buffer[a - self._buffer_at : b - self._buffer_at]


def build_loop(generated: np.ndarray, total_samples: int, sample_rate: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The loop from a whole generated clip (total_samples + LoopSeam(...).extra_samples long)."""
    seam = LoopSeam(total_samples, sample_rate)
    out = np.concatenate([seam.add(generated), seam.finish()])
    assert seam.loop_points is not None
    return out, seam.loop_points
