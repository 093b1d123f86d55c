"""The simulator's deterministic tokenizer and its deterministic output text.

No real vocabulary: a prompt text has one token per `chars_per_token` characters (rounded up, at least
one), and block k of the prompt is the text slice of `block_size` tokens starting at token k*block_size.
Block hashes are chained (each seeds the next with the previous hash), so equal hashes mean equal
prefixes, exactly like vLLM's prefix-cache keys. A prompt given as token ids uses the ids as they are.
Generated text cycles through a fixed list of word pieces from an offset chosen by the prompt's hash, so
the same prompt always gets the same answer.
"""

from __future__ import annotations

from array import array

import xxhash

_hash = xxhash.xxh3_64_intdigest

_REPLY = (
    "The simulated engine answers with a fixed text that cycles through these word pieces, so every"
    " prompt gets the same reply each time. It models a running batch, a waiting queue, KV blocks and"
    " an exact prefix cache, and each token takes one engine step."
)
PIECES: tuple[str, ...] = tuple(" " + word for word in _REPLY.split())
"""Output tokens: about four characters each, spaces leading like a BPE vocabulary's."""


class Prompt:
    """A tokenized prompt: its length in tokens, its full blocks' chained hashes and a content seed."""

    __slots__ = ("block_hashes", "n_tokens", "seed")

    def __init__(self, n_tokens: int, block_hashes: list[int], seed: int) -> None:
        self.n_tokens = n_tokens
        self.block_hashes = block_hashes
        self.seed = seed


def tokenize_text(text: str, chars_per_token: int, block_size: int) -> Prompt:
    n_tokens = max(1, -(-len(text) // chars_per_token))
    block_chars = chars_per_token * block_size
    hashes: list[int] = []
    h = 0
    for k in range(n_tokens // block_size):
        h = _hash(text[k * block_chars : (k + 1) * block_chars].encode(), h)
        hashes.append(h)
    return Prompt(n_tokens, hashes, _hash(text.encode()))


def tokenize_ids(ids: list[int], block_size: int) -> Prompt:
    data = array("q", ids).tobytes()
    n_tokens = max(1, len(ids))
    block_bytes = 8 * block_size
    hashes: list[int] = []
    h = 0
    for k in range(len(ids) // block_size):
        h = _hash(data[k * block_bytes : (k + 1) * block_bytes], h)
        hashes.append(h)
    return Prompt(n_tokens, hashes, _hash(data))


def piece(seed: int, i: int) -> str:
    """The i-th generated token's text for a prompt with this seed."""
    return PIECES[(seed + i) % len(PIECES)]


def text(seed: int, start: int, stop: int) -> str:
    return "".join([PIECES[(seed + i) % len(PIECES)] for i in range(start, stop)])
