"""The part of a request body the gateway decodes to route it (the body itself goes upstream untouched).

A module of its own because msgspec resolves a Struct's annotations from its module at run time, which a
mypyc-compiled module (`gateway.proxy`) does not keep.
"""

from __future__ import annotations

from typing import Any

import msgspec


class RoutingFields(msgspec.Struct):
    """The only part of a request body the gateway decodes; the body itself goes upstream untouched."""

    model: str | None = None
    stream: bool | None = None
    messages: list[Any] | None = None
    prompt: Any = None
    input: Any = None
    """Embeddings input: routed by its (first) text like a completions prompt."""
    user: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream_options: dict[str, Any] | None = None
