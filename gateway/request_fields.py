"""The part of a request body the gateway decodes to route it (the body itself goes upstream untouched).

A module of its own because msgspec resolves a Struct's annotations from its module at run time, which a
mypyc-compiled module (`gateway.proxy`) does not keep.
"""

from __future__ import annotations

from typing import Any

import msgspec


class RoutingFields(msgspec.Struct, gc=False):
    """The only part of a request body the gateway decodes; the body itself goes upstream untouched.

    Only fields that routing reads: every other key is skipped unread (and validated by the engine).
    `gc=False`: a decoded request holds no reference cycles, so the collector need not track it."""

    model: str | None = None
    messages: list[Any] | None = None
    prompt: Any = None
    input: Any = None
    """Embeddings input: routed by its (first) text like a completions prompt."""
    user: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
