"""What the routing policies know of one request (a plain class, so compiled code reads it directly)."""

from __future__ import annotations


class RouteRequest:
    """The routing-relevant fields of one request, decoded once by the data plane."""

    __slots__ = (
        "max_tokens",
        "model",
        "prefix_hashes",
        "prefix_key",
        "prefix_key_known",
        "profile_header",
        "prompt_tokens",
        "session_id",
        "strategy_header",
        "text",
    )

    def __init__(
        self,
        model: str,
        text: str,
        *,
        max_tokens: int | None = None,
        session_id: str | None = None,
        strategy_header: str | None = None,
        profile_header: str | None = None,
    ) -> None:
        self.model = model
        self.text = text
        """Routing text: chat messages with role markers, or the completions prompt."""
        self.prompt_tokens = len(text) // 4 + 1
        """Estimated with ~4 characters a token: no tokenizer on the hot path."""
        self.max_tokens = max_tokens
        self.session_id = session_id
        self.strategy_header = strategy_header
        """Value of the `routing-strategy` request header, if any."""
        self.profile_header = profile_header
        """Value of the `config-profile` request header, if any."""
        self.prefix_hashes: tuple[int, ...] | None = None
        """Memo of the prefix index: the text's block hashes, computed once per request."""
        self.prefix_key: int | None = None
        """Memo of the prefix index: the tie-break key (valid once `prefix_key_known`)."""
        self.prefix_key_known = False
