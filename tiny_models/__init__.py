"""Tiny checkpoints of the real architectures (random weights, locally trained tokenizers) for tests, `make demo`
and the benchmark's tokenizers. Test and demo tooling: not part of the installed package.

    python -m tiny_models.vlm models/tiny/vlm
    python -m tiny_models.audio models/tiny/audio
"""
