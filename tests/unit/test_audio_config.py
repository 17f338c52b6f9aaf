"""The audio service's fast-path settings: flags reach the config, and the device-dependent defaults resolve."""
from __future__ import annotations

from audio_service.config import (
    COMPILE_DEFAULT_BUCKETS,
    AudioConfig,
    effective_buckets,
    effective_max_batch_size,
    parse_args,
)


def test_fast_path_flags_reach_the_config():
    config = parse_args(["--compile", "reduce-overhead", "--duration-buckets", "4,10", "--prompt-cache-size", "0",
                         "--max-batch-size", "6"])
    assert (config.compile, config.duration_buckets, config.prompt_cache_size, config.max_batch_size) == (
        "reduce-overhead", (4.0, 10.0), 0, 6)
    plain = parse_args([])
    assert (plain.compile, plain.duration_buckets, plain.max_batch_size) == ("none", (), 0)


def test_batch_size_default_is_8_unless_set():
    assert effective_max_batch_size(AudioConfig(device="cuda:1")) == 8
    assert effective_max_batch_size(AudioConfig(device="cpu")) == 8  # a batch is cheaper per clip on CPU too
    assert effective_max_batch_size(AudioConfig(device="cuda", max_batch_size=3)) == 3


def test_a_compiled_model_always_gets_buckets():
    assert effective_buckets(AudioConfig()) == ()  # eager: exact durations
    assert effective_buckets(AudioConfig(compile="default")) == COMPILE_DEFAULT_BUCKETS
    assert effective_buckets(AudioConfig(compile="default", duration_buckets=(10.0,))) == (10.0,)
