"""The routing text of a request: what prefix hashing and length buckets look at.

Role markers keep "user: X" and "system: X" apart, so two chats with the same words in different roles do
not share a prefix. No tokenizer: the hot path stays linear in characters.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    return ""


_MARKS: Final = {
    role: f"<|{role}|>" for role in ("system", "developer", "user", "assistant", "tool", "function")
}


def chat_text(messages: Iterable[Any]) -> str:
    """`<|role|>content` for each message, in order; malformed entries contribute nothing."""
    out: list[str] = []
    for message in messages:
        if isinstance(message, dict):
            role = message.get("role")
            if not isinstance(role, str):
                role = ""
            mark = _MARKS.get(role)
            out.append(mark if mark is not None else f"<|{role}|>")
            content = message.get("content")
            out.append(content if isinstance(content, str) else _content_text(content))
    return "".join(out)


def completion_text(prompt: Any) -> str:
    """A completions prompt: a string, or the first of a list of strings (a batch routes by its first)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str):
            return first
        if isinstance(first, int):
            return " ".join(str(t) for t in prompt)
        if isinstance(first, list):
            return " ".join(str(t) for t in first)
    return ""
