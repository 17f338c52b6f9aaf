"""The speech/music guard: a clip that the audio model's own CLAP finds closer to speech, singing or music
than to its caption is made again with the next seed (`reject_speech_music` = N retries at most).

The negative prompt helps but does not guarantee it (MMAudio's maintainers: it needs data). CLAP is
already inside the AudioLDM2 checkpoint (the backend's `score_candidates`: cosine similarity of text and
audio embeddings, the clip resampled to 48 kHz and centre-cropped to CLAP's 10 s window), so the check
costs one CLAP forward. A try is refused when `max(speech, singing, music) > caption - margin`
(`--speech-music-margin`, default 0: refused when an unwanted text simply scores higher). Every try is
recorded; when all N + 1 fail the last one is kept.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

__all__ = ["UNWANTED", "GuardAttempt", "guard_seed", "judge"]

UNWANTED = ("speech", "singing", "music")


@dataclass(frozen=True)
class GuardAttempt:
    seed: int
    caption_score: float
    speech_score: float
    singing_score: float
    music_score: float
    rejected: bool


def guard_seed(seed: int, attempt: int) -> int:
    """The seed of try `attempt`: the request's own first, then one derived from both."""
    if attempt == 0:
        return seed
    return int(np.random.SeedSequence([seed, 0x6775617264, attempt]).generate_state(1, np.uint64)[0] >> np.uint64(1))


async def judge(backend, caption: str, waveform: np.ndarray, seed: int, margin: float) -> GuardAttempt:
    """Scores one clip (or a long clip's first window) against its caption and the unwanted texts."""
    texts = [caption, *UNWANTED]
    clips = np.repeat(np.asarray(waveform, dtype=np.float32)[None, None], len(texts), axis=0)  # each text its own
    scores = (await asyncio.to_thread(backend.score_candidates, texts, clips))[:, 0]
    caption_score, speech, singing, music = (float(s) for s in scores)
    return GuardAttempt(seed=seed, caption_score=caption_score, speech_score=speech, singing_score=singing,
                        music_score=music, rejected=max(speech, singing, music) > caption_score - margin)
