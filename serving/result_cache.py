"""A cache of finished model results, keyed by content, used by both model services.

    cache = open_cache(config.cache, "audio")              # at start-up (check_options first: bad URL -> one line)
    value = await cache.lookup(key, bypass=False)           # bytes, or None (miss, bypass, no key, Redis down)
    await cache.store(key, value)

A key (`content_key`) is a hash of everything that decides the result, model id and revision included, so a
result is never served across revisions; a service passes `key=None` for a request whose result is not
determined (no seed: it asks for a new sample), which is neither looked up nor stored.

Where results live (`--cache-url`):
- empty (default): this process's memory, bounded by `--cache-max-bytes`, least recently used dropped first.
- `redis://host:port/db` (or `rediss://`): one Redis shared by the replicas (its own `maxmemory` policy bounds
  it; entries also expire after `--cache-ttl-seconds`). When Redis stops answering, requests go on without the
  cache (a miss; nothing fails for it), the log says so once, and Redis is tried again after
  `--cache-retry-seconds`; the log says when it answers again.
- `off`: no cache.

Metrics (serving.metrics): i2s_cache_lookups_total{cache, result}, i2s_cache_evictions_total{cache},
i2s_cache_bytes{cache}.
"""
from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from serving import metrics
from serving.config import setting
from serving.startup import StartupError

log = logging.getLogger(__name__)
KEY_PREFIX = "i2s:v1:"  # a change of the stored format changes this prefix


@dataclass(frozen=True)
class CacheOptions:
    cache_url: str = setting("", "where finished results are kept: empty: this process's memory; "
                             "redis://host:port/db: one Redis shared by the replicas; off: nowhere")
    cache_max_bytes: int = setting(256 * 2**20, "bytes of results kept in this process's memory (least "
                                   "recently used dropped first)")
    cache_ttl_seconds: int = setting(7 * 24 * 3600, "how long Redis keeps a result (its maxmemory policy may drop "
                                     "it sooner)")
    cache_timeout_seconds: float = setting(0.25, "longest wait for Redis per operation; past it the request goes "
                                           "on without the cache")
    cache_retry_seconds: float = setting(5.0, "after Redis failed, how long requests skip it before trying again")


def content_key(kind: str, **parts: Any) -> str:
    """A key from the parts that decide a result (JSON-able values; bytes are hashed first)."""
    plain = {name: hashlib.sha256(value).hexdigest() if isinstance(value, bytes) else value
             for name, value in parts.items()}
    digest = hashlib.sha256(json.dumps(plain, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"{KEY_PREFIX}{kind}:{digest}"


def pack(frames: list[bytes]) -> bytes:
    """Frames (serialized messages, raw arrays) into one value: each prefixed by its length."""
    return b"".join(struct.pack("<Q", len(frame)) + frame for frame in frames)


def unpack(value: bytes) -> list[bytes]:
    frames, at = [], 0
    while at < len(value):
        (size,) = struct.unpack_from("<Q", value, at)
        at += 8
        frames.append(value[at:at + size])
        at += size
    return frames


class ResultCache:
    """What a service holds: lookups and stores, counted by result. Keeps nothing itself (`--cache-url off`);
    subclasses keep the bytes."""

    RESULTS = ("hit", "miss", "bypass", "uncacheable", "error")

    def __init__(self, name: str):
        self.name = name  # the metrics' `cache` label: vlm, audio
        for result in self.RESULTS:  # every series exists from the start (at 0), so rates and ratios have data
            metrics.CACHE_LOOKUPS.labels(cache=name, result=result)
        metrics.CACHE_EVICTIONS.labels(cache=name)

    async def lookup(self, key: str | None, bypass: bool = False) -> bytes | None:
        """The stored result, or None: no key (not cacheable), `bypass`, a miss, or the store unreachable."""
        if key is None:
            result, value = "uncacheable", None
        elif bypass:
            result, value = "bypass", None
        else:
            value = await self._get(key)
            result = "hit" if value is not None else "miss"
        metrics.CACHE_LOOKUPS.labels(cache=self.name, result=result).inc()
        return value

    async def store(self, key: str | None, value: bytes) -> None:
        if key is not None:
            await self._put(key, value)

    async def _get(self, key: str) -> bytes | None:
        return None

    async def _put(self, key: str, value: bytes) -> None:
        pass

    async def close(self) -> None:
        pass


class MemoryCache(ResultCache):
    """This process's results, at most `max_bytes` of them (values; keys are small), least recently used
    dropped first. A value larger than the whole budget is not kept."""

    def __init__(self, name: str, max_bytes: int):
        super().__init__(name)
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        metrics.CACHE_BYTES.labels(cache=name).set_function(lambda: self.bytes)

    async def _get(self, key: str) -> bytes | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    async def _put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        self.bytes -= len(old) if old is not None else 0
        self._entries[key] = value
        self.bytes += len(value)
        while self.bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= len(dropped)
            metrics.CACHE_EVICTIONS.labels(cache=self.name).inc()


class RedisCache(ResultCache):
    """Results in a Redis shared by the replicas. Never fails a request: an error or a timeout is a miss
    (logged once per outage), and Redis is left alone for `retry_seconds` before the next try."""

    def __init__(self, name: str, url: str, options: CacheOptions):
        super().__init__(name)
        import redis.asyncio

        self.url = _shown(url)
        self.ttl_seconds = options.cache_ttl_seconds
        self.retry_seconds = options.cache_retry_seconds
        timeout = options.cache_timeout_seconds
        self._client = redis.asyncio.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._down_until: float | None = None  # monotonic time before which Redis is skipped; None: up

    async def _call(self, operation: str, *args):
        import redis

        now = time.monotonic()
        if self._down_until is not None and now < self._down_until:
            return None
        try:
            result = await getattr(self._client, operation)(*args)
        except (redis.RedisError, OSError) as exc:
            if self._down_until is None:
                log.warning("result cache %s unavailable (%s: %s); serving without it, retrying every %g s",
                            self.url, type(exc).__name__, exc, self.retry_seconds)
            self._down_until = now + self.retry_seconds
            metrics.CACHE_LOOKUPS.labels(cache=self.name, result="error").inc()
            return None
        if self._down_until is not None:
            log.warning("result cache %s reachable again", self.url)
            self._down_until = None
        return result

    async def _get(self, key: str) -> bytes | None:
        return await self._call("get", key)

    async def _put(self, key: str, value: bytes) -> None:
        await self._call("set", key, value, self.ttl_seconds)

    async def close(self) -> None:
        await self._client.aclose()


def _shown(url: str) -> str:
    """The URL without its password, for logs and messages."""
    parts = urlsplit(url)
    return url.replace(f":{parts.password}@", ":***@") if parts.password else url


def _redis_url(options: CacheOptions) -> str | None:
    """The Redis URL of `options` (None: memory or off); StartupError for a URL that is neither."""
    url = options.cache_url.strip()
    if url in ("", "off"):
        return None
    try:
        parts = urlsplit(url)
        parts.port  # raises ValueError on a port that is not a number
    except ValueError as exc:
        raise StartupError(f"--cache-url {_shown(url)}: malformed ({exc}); give redis://host:port/db") from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise StartupError(f"--cache-url {_shown(url)}: not a redis://host:port/db URL (empty: this process's "
                           "memory; off: no cache)")
    if parts.path.strip("/") and not parts.path.strip("/").isdigit():
        raise StartupError(f"--cache-url {_shown(url)}: the database must be a number (redis://host:port/0)")
    return url


def check_options(options: CacheOptions) -> None:
    """At start-up: a malformed URL, or a Redis that does not answer, raises StartupError (one line)."""
    if options.cache_max_bytes < 0 or options.cache_ttl_seconds < 1 or options.cache_timeout_seconds <= 0:
        raise StartupError("--cache-max-bytes must be >= 0, --cache-ttl-seconds >= 1, --cache-timeout-seconds > 0")
    url = _redis_url(options)
    if url is None:
        return
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        raise StartupError(f"--cache-url {_shown(url)}: Redis does not answer ({exc}); start it, fix the URL, "
                           "or leave --cache-url empty for an in-process cache") from None
    finally:
        client.close()


def open_cache(options: CacheOptions, name: str) -> ResultCache:
    """The cache `options` name (the URL already checked by check_options at start-up). Connects lazily."""
    url = _redis_url(options)
    if url is not None:
        return RedisCache(name, url, options)
    if options.cache_url.strip() == "off" or options.cache_max_bytes == 0:
        return ResultCache(name)
    return MemoryCache(name, options.cache_max_bytes)
