"""Routing profiles in AIBrix's `model.aibrix.ai/config` JSON, compiled once at load time.

Accepted verbatim: `defaultProfile`, `lockedRoutingStrategy`, `profiles.{name}` with `routingStrategy`,
`requestsPerSecond` (0 or absent = unlimited) and `routingConfig` whose request hints select a profile under
`config-profile: auto`: `promptLenBucketMinLength`/`MaxLength` (inclusive, max 0 = unlimited),
`promptTokensGte`/`Lt`, `maxTokensGte`/`Lt`. The older shape with the bucket fields at the profile's top
level loads with a warning. Fields only AIBrix's `pd` strategy reads load with a warning too, as does a
strategy AIBrix has but this gateway does not implement (requests resolving to it get 400). Anything else
wrong is a `ProfileError` naming the file, the field and the reason.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import orjson

from policies.base import RouteRequest
from policies.chain import Chain, StrategyError, parse_strategy

log = logging.getLogger(__name__)

_BUCKET_FIELDS = ("promptLenBucketMinLength", "promptLenBucketMaxLength")
_HINT_FIELDS = (*_BUCKET_FIELDS, "promptTokensGte", "promptTokensLt", "maxTokensGte", "maxTokensLt")
_PD_FIELDS = frozenset({"prefillScorePolicy", "decodeScorePolicy", "combined"})
_UNBOUNDED = 1 << 62


class ProfileError(Exception):
    """A profile file that cannot be used, phrased as `file: $.field: reason`."""


class Hints:
    """Request-local conditions of one profile (all must hold). Counts and span rank specificity."""

    __slots__ = ("count", "max_hi", "max_lo", "prompt_hi", "prompt_lo", "span")

    def __init__(self, config: dict[str, int]) -> None:
        lo = max(config.get("promptLenBucketMinLength", 0), config.get("promptTokensGte", 0))
        hi = _UNBOUNDED
        if config.get("promptLenBucketMaxLength", 0) > 0:
            hi = config["promptLenBucketMaxLength"] + 1
        if "promptTokensLt" in config:
            hi = min(hi, config["promptTokensLt"])
        self.prompt_lo = lo
        self.prompt_hi = hi
        """Half-open [lo, hi) in estimated prompt tokens."""
        self.max_lo = config.get("maxTokensGte")
        self.max_hi = config.get("maxTokensLt")
        self.count = sum(
            1
            for field in _HINT_FIELDS
            if field in config and not (field in _BUCKET_FIELDS and config[field] == 0)
        )
        """Constraining fields: the more, the more specific the profile under `auto`."""
        self.span = (hi - lo) + ((self.max_hi or _UNBOUNDED) - (self.max_lo or 0))
        """Width of the accepted ranges: the narrower, the more specific among equal counts."""

    def matches(self, prompt_tokens: int, max_tokens: int | None) -> bool:
        if not self.prompt_lo <= prompt_tokens < self.prompt_hi:
            return False
        if self.max_lo is None and self.max_hi is None:
            return True
        if max_tokens is None:
            return False
        if self.max_lo is not None and max_tokens < self.max_lo:
            return False
        return self.max_hi is None or max_tokens < self.max_hi


class Profile:
    """One compiled profile."""

    __slots__ = ("chain", "hints", "name", "refusal", "requests_per_second", "routing_config", "strategy")

    def __init__(
        self,
        name: str,
        strategy: str | None,
        chain: Chain | None,
        refusal: StrategyError | None,
        requests_per_second: float,
        hints: Hints,
        routing_config: dict[str, Any],
    ) -> None:
        self.name = name
        self.strategy = strategy
        self.chain = chain
        self.refusal = refusal
        """Set when the strategy is an AIBrix one this gateway does not implement: requests get 400."""
        self.requests_per_second = requests_per_second
        self.hints = hints
        self.routing_config = routing_config


class ProfileSet:
    """A loaded profile file."""

    __slots__ = (
        "auto_order",
        "default",
        "locked",
        "locked_chain",
        "locked_refusal",
        "path",
        "profiles",
        "stamp",
        "warnings",
    )

    def __init__(
        self,
        path: str,
        profiles: dict[str, Profile],
        default: str | None,
        locked: str | None,
        locked_chain: Chain | None,
        locked_refusal: StrategyError | None,
        warnings: list[str],
        stamp: tuple[int, int] | None = None,
    ) -> None:
        self.path = path
        self.profiles = profiles
        self.default = default
        """Name of the profile used without a `config-profile` header (None: no profile applies)."""
        self.locked = locked
        self.locked_chain = locked_chain
        self.locked_refusal = locked_refusal
        self.warnings = warnings
        self.stamp = stamp
        """(mtime_ns, size) of the file when loaded: compare with `file_stamp(path)` to detect changes."""
        self.auto_order = sorted(
            (p for p in profiles.values() if p.hints.count),
            key=lambda p: (-p.hints.count, p.hints.span),
        )
        """Profiles with hints, most specific first (file order among equals)."""

    def resolve(self, req: RouteRequest) -> Profile | None:
        """The profile of a request: `config-profile` by name, `auto` by hints, else the default."""
        name = req.profile_header
        if name:
            name = name.strip()
            if name == "auto":
                prompt_tokens = req.prompt_tokens
                for profile in self.auto_order:
                    if profile.hints.matches(prompt_tokens, req.max_tokens):
                        return profile
            else:
                found = self.profiles.get(name)
                if found is not None:
                    return found
        return self.profiles.get(self.default) if self.default is not None else None


def file_stamp(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """Cheap change detector for reload-on-change: (mtime_ns, size), None if unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def load_profiles(path: str | os.PathLike[str]) -> ProfileSet:
    """Read and compile a profile file, or raise ProfileError. Warnings are logged and kept on the set."""
    where = str(path)
    stamp = file_stamp(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ProfileError(f"{where}: cannot read: {exc.strerror or exc}") from exc
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProfileError(f"{where}: not valid JSON: {exc}") from exc
    profiles = parse_profiles(data, where)
    profiles.stamp = stamp
    for warning in profiles.warnings:
        log.warning("%s", warning)
    return profiles


def parse_profiles(data: Any, where: str = "<profiles>") -> ProfileSet:
    """Compile already-decoded profile JSON (e.g. an annotation's value)."""
    warnings: list[str] = []
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: $: expected a JSON object, got {_kind(data)}")
    for key in data:
        if key not in ("defaultProfile", "lockedRoutingStrategy", "profiles"):
            warnings.append(f"{where}: $.{key}: unknown field, ignored")
    raw_profiles = data.get("profiles")
    if raw_profiles is None:
        raw_profiles = {}
        if "lockedRoutingStrategy" not in data:
            raise ProfileError(f"{where}: $.profiles: missing (a map of named profiles)")
    if not isinstance(raw_profiles, dict):
        raise ProfileError(f"{where}: $.profiles: expected an object, got {_kind(raw_profiles)}")
    profiles: dict[str, Profile] = {}
    for name, body in raw_profiles.items():
        profiles[name] = _parse_profile(name, body, where, warnings)

    default = data.get("defaultProfile")
    if default is not None:
        if not isinstance(default, str):
            raise ProfileError(f"{where}: $.defaultProfile: expected a string, got {_kind(default)}")
        if default not in profiles:
            raise ProfileError(f"{where}: $.defaultProfile: no profile named {default!r}")
    elif "default" in profiles:
        default = "default"

    locked = data.get("lockedRoutingStrategy")
    locked_chain = None
    locked_refusal = None
    if locked is not None:
        if not isinstance(locked, str):
            raise ProfileError(f"{where}: $.lockedRoutingStrategy: expected a string, got {_kind(locked)}")
        locked_chain, locked_refusal = _compile(locked, f"{where}: $.lockedRoutingStrategy", warnings)
        locked = locked.strip()
    return ProfileSet(where, profiles, default, locked, locked_chain, locked_refusal, warnings)


def _parse_profile(name: str, body: Any, where: str, warnings: list[str]) -> Profile:
    at = f"{where}: $.profiles.{name}"
    if not isinstance(body, dict):
        raise ProfileError(f"{at}: expected an object, got {_kind(body)}")
    strategy = body.get("routingStrategy")
    chain = None
    refusal = None
    if strategy is not None:
        if not isinstance(strategy, str):
            raise ProfileError(f"{at}.routingStrategy: expected a string, got {_kind(strategy)}")
        chain, refusal = _compile(strategy, f"{at}.routingStrategy", warnings)
        strategy = strategy.strip()

    rps = body.get("requestsPerSecond", 0)
    if isinstance(rps, bool) or not isinstance(rps, int | float) or rps < 0:
        raise ProfileError(f"{at}.requestsPerSecond: expected a number >= 0, got {rps!r}")

    raw_config = body.get("routingConfig", {})
    if not isinstance(raw_config, dict):
        raise ProfileError(f"{at}.routingConfig: expected an object, got {_kind(raw_config)}")
    config: dict[str, Any] = dict(raw_config)
    for field in _BUCKET_FIELDS:
        if field in body:
            if field in config:
                warnings.append(
                    f"{at}.{field}: older top-level bucket field ignored: routingConfig.{field} is set"
                )
            else:
                warnings.append(f"{at}.{field}: older top-level bucket field, read as routingConfig.{field}")
                config[field] = body[field]
    for key in body:
        if key in ("routingStrategy", "requestsPerSecond", "routingConfig", *_BUCKET_FIELDS):
            continue
        if key in _PD_FIELDS:
            warnings.append(f"{at}.{key}: used only by AIBrix's pd strategy, ignored")
        else:
            warnings.append(f"{at}.{key}: unknown field, ignored")

    hint_values: dict[str, int] = {}
    for key, value in config.items():
        if key in _HINT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ProfileError(f"{at}.routingConfig.{key}: expected an integer >= 0, got {value!r}")
            hint_values[key] = value
        elif key in _PD_FIELDS:
            warnings.append(f"{at}.routingConfig.{key}: used only by AIBrix's pd strategy, ignored")
        else:
            warnings.append(f"{at}.routingConfig.{key}: unknown field, ignored")
    lo = hint_values.get("promptLenBucketMinLength", 0)
    hi = hint_values.get("promptLenBucketMaxLength", 0)
    if hi and lo > hi:
        raise ProfileError(
            f"{at}.routingConfig.promptLenBucketMaxLength: {hi} is below promptLenBucketMinLength {lo}"
        )
    for low, high in (("promptTokensGte", "promptTokensLt"), ("maxTokensGte", "maxTokensLt")):
        if low in hint_values and high in hint_values and hint_values[low] >= hint_values[high]:
            raise ProfileError(
                f"{at}.routingConfig.{high}: {hint_values[high]} must be above {low} {hint_values[low]}"
            )
    return Profile(name, strategy, chain, refusal, float(rps), Hints(hint_values), config)


def _compile(text: str, at: str, warnings: list[str]) -> tuple[Chain | None, StrategyError | None]:
    try:
        return parse_strategy(text), None
    except StrategyError as exc:
        if exc.unsupported:
            warnings.append(f"{at}: {exc.reason}: requests resolving to it get 400")
            return None, exc
        raise ProfileError(f"{at}: {exc.reason}") from exc


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, int | float) else "null"
    )
