"""The result cache's mechanism (serving.result_cache): keys by content, the in-memory store bounded by bytes
with least-recently-used eviction, and what is counted. No model here; the services' use of it, with the tiny
models and a real Redis, is in tests/integration/test_result_cache.py."""
from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from serving.result_cache import CacheOptions, MemoryCache, ResultCache, content_key, open_cache, pack, unpack
from serving.startup import StartupError


def count(cache: str, result: str) -> float:
    return REGISTRY.get_sample_value("i2s_cache_lookups_total", {"cache": cache, "result": result}) or 0.0


def evictions(cache: str) -> float:
    return REGISTRY.get_sample_value("i2s_cache_evictions_total", {"cache": cache}) or 0.0


def test_a_key_changes_with_every_part_and_never_with_their_order():
    base = dict(request={"prompt": "rain", "seed": 1}, model_id="m", revision="r1")
    key = content_key("audio", **base)
    assert key == content_key("audio", revision="r1", model_id="m", request={"seed": 1, "prompt": "rain"})
    assert key != content_key("audio", **{**base, "revision": "r2"})  # never across revisions
    assert key != content_key("audio", **{**base, "request": {"prompt": "rain", "seed": 2}})
    assert key != content_key("vlm", **base)
    assert content_key("vlm", image=b"\x00" * 10) != content_key("vlm", image=b"\x00" * 11)  # bytes hashed


def test_frames_pack_and_unpack_exactly():
    frames = [b"", b"metadata", bytes(range(256)) * 3]
    assert unpack(pack(frames)) == frames


async def test_memory_cache_keeps_at_most_its_bytes_dropping_the_least_recently_used():
    cache, before = MemoryCache("unit-lru", max_bytes=100), evictions("unit-lru")
    await cache.store("a", b"a" * 40)
    await cache.store("b", b"b" * 40)
    assert await cache.lookup("a") == b"a" * 40  # a is now the most recently used
    await cache.store("c", b"c" * 40)  # 120 > 100: b goes, not a
    assert cache.bytes == 80 and await cache.lookup("b") is None
    assert await cache.lookup("a") is not None and await cache.lookup("c") is not None
    await cache.store("huge", b"h" * 101)  # larger than the whole budget: not kept, nothing dropped for it
    assert await cache.lookup("huge") is None and cache.bytes == 80
    assert evictions("unit-lru") - before == 1
    assert REGISTRY.get_sample_value("i2s_cache_bytes", {"cache": "unit-lru"}) == 80


async def test_lookups_are_counted_by_result_and_an_uncacheable_or_bypassed_one_reads_nothing():
    cache = MemoryCache("unit-count", max_bytes=1000)
    await cache.store("k", b"value")
    await cache.store(None, b"not kept")  # no key: a seedless request's result
    before = {r: count("unit-count", r) for r in ("hit", "miss", "bypass", "uncacheable")}
    assert await cache.lookup("k") == b"value"
    assert await cache.lookup("other") is None
    assert await cache.lookup("k", bypass=True) is None
    assert await cache.lookup(None) is None
    counted = {r: count("unit-count", r) - before[r] for r in before}
    assert counted == {"hit": 1, "miss": 1, "bypass": 1, "uncacheable": 1}
    assert cache.bytes == len(b"value")


def test_the_url_chooses_the_store_and_a_bad_one_says_what_to_give():
    assert isinstance(open_cache(CacheOptions(), "x"), MemoryCache)
    assert type(open_cache(CacheOptions(cache_url="off"), "x")) is ResultCache
    assert type(open_cache(CacheOptions(cache_max_bytes=0), "x")) is ResultCache
    assert type(open_cache(CacheOptions(cache_url="redis://localhost:6379/0"), "x")).__name__ == "RedisCache"
    for url, message in (("redis://localhost:63a9/0", "malformed"), ("memcached://x:1", "not a redis://"),
                         ("redis:///0", "not a redis://"), ("redis://localhost:6379/db", "must be a number")):
        with pytest.raises(StartupError, match=message):
            open_cache(CacheOptions(cache_url=url), "x")


def test_a_password_in_the_url_never_reaches_a_message():
    from serving.result_cache import check_options

    with pytest.raises(StartupError) as refused:
        check_options(CacheOptions(cache_url="redis://user:s3cret@localhost:port/0"))
    assert "s3cret" not in str(refused.value) and ":***@" in str(refused.value)


class FakeIdentityBackend:
    """NOT a model: only the identity an audio backend puts into its cache keys."""

    def result_identity(self) -> dict:
        return {"model_id": "tiny", "revision": "r1"}


def test_the_guard_margin_is_part_of_a_guarded_clips_key_only():
    from audio_service.clip_cache import clip_key
    from i2s_formats.contract import generate_audio
    from image_to_sound.v1 import common_pb2

    def key(margin: float, **settings) -> str | None:
        call = generate_audio("rain on a tin roof", common_pb2.AudioSettings(seed=3, **settings), "c")
        return clip_key(call, FakeIdentityBackend(), guard_margin=margin)

    assert key(0.5, reject_speech_music=2) != key(1.5, reject_speech_music=2)  # the margin decides the kept try
    assert key(0.5) == key(1.5)  # unguarded: the margin changes nothing, so it does not split the cache
    assert key(0.5, loop=True) != key(0.5) != key(0.5, duration_seconds=45.0)  # loop and length are in the key
    assert key(0.5, reject_speech_music=2) != key(0.5, reject_speech_music=3)
