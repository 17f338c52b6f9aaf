"""What the model thread hands a request's consumer: small typed messages (engine and reference alike).

A request's ``deliver`` callable receives, in order, any number of :class:`Tokens`, then exactly one
:class:`Finished` or :class:`Failed`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Tokens:
    """Token ids the request produced since the previous message."""

    ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Finished:
    """The request ended: ``reason`` is stop | length | cancelled | deadline; ``steps``: model forwards it took."""

    reason: str
    steps: int


@dataclass(frozen=True, slots=True)
class Failed:
    """The request ended with an error (raised to its consumer)."""

    error: BaseException


Delivery = Tokens | Finished | Failed
