"""AIBrix profile files: the shared fixtures, precedence, `auto`, bucket boundaries, rate limits, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from policies.base import RoutingError
from policies.chain import DEFAULT_STRATEGY
from policies.profiles import ProfileError, file_stamp, load_profiles
from policies.router import make_router
from tests.procs import FIXTURES
from tests.test_policies_scorers import NOW, FakeReplica, req

AIBRIX = FIXTURES / "aibrix"
REPLICAS = [FakeReplica("a"), FakeReplica("b")]


def write(tmp_path: Path, data: Any, name: str = "profiles.json") -> Path:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else orjson.dumps(data))
    return path


def test_every_shared_fixture_loads() -> None:
    files = sorted(AIBRIX.glob("*.json"))
    assert len(files) == 3
    for path in files:
        assert load_profiles(path).profiles


def test_mock_fixture_default_auto_and_rate_limit() -> None:
    router = make_router(load_profiles(AIBRIX / "mock-config-profile.json"), None)
    plain = router.select(req("hello"), REPLICAS, NOW)
    assert (plain.strategy, plain.profile) == ("least-request", "least-request")
    long_gen = router.select(req("hello", max_tokens=4096, profile_header="auto"), REPLICAS, NOW)
    assert (long_gen.strategy, long_gen.profile) == ("throughput", "long-generation")
    short_gen = router.select(req("hello", max_tokens=100, profile_header="auto"), REPLICAS, NOW)
    assert short_gen.profile == "least-request"
    named = router.select(req("hello", profile_header="cache-friendly"), REPLICAS, NOW)
    assert (named.strategy, named.profile) == ("least-kv-cache", "cache-friendly")
    assert router.select(req("x", profile_header="rps-limited"), REPLICAS, NOW).profile == "rps-limited"
    with pytest.raises(RoutingError) as info:
        router.select(req("x", profile_header="rps-limited"), REPLICAS, NOW + 0.1)
    assert info.value.status == 429
    assert info.value.code == "rate_limit_exceeded"
    assert ("retry-after", "1") in info.value.headers
    assert router.select(req("x", profile_header="rps-limited"), REPLICAS, NOW + 1.2).profile == "rps-limited"


def test_docs_fixture_pd_profile_loads_with_a_warning_and_refuses_requests() -> None:
    profiles = load_profiles(AIBRIX / "docs-gateway-plugins-profiles.json")
    assert any("large-input.routingStrategy" in w and "not implemented" in w for w in profiles.warnings)
    assert any("prefillScorePolicy" in w for w in profiles.warnings)
    router = make_router(profiles, None)
    assert router.select(req("x"), REPLICAS, NOW).profile == "default"
    long_prompt = "word " * 8192 * 2  # ~10k estimated tokens
    with pytest.raises(RoutingError) as info:
        router.select(req(long_prompt, profile_header="auto"), REPLICAS, NOW)
    assert info.value.status == 400 and info.value.message == "incorrect routing strategy pd"
    # The header still overrides a profile's strategy when nothing is locked.
    ok = router.select(
        req(long_prompt, profile_header="auto", strategy_header="least-request"), REPLICAS, NOW
    )
    assert (ok.strategy, ok.profile) == ("least-request", "large-input")
    offline = router.select(req("x", max_tokens=2048, profile_header="auto"), REPLICAS, NOW)
    assert offline.profile == "offline-generation"


def test_locked_fixture_beats_the_header() -> None:
    router = make_router(load_profiles(AIBRIX / "docs-gateway-plugins-locked-strategy.json"), None)
    for header in (None, "least-request", "garbage"):
        with pytest.raises(RoutingError) as info:
            router.select(req("x", strategy_header=header, profile_header="batch"), REPLICAS, NOW)
        assert info.value.status == 400
        assert ("x-error-routing", "true") in info.value.headers


def test_precedence_locked_then_header_then_profile_then_default(tmp_path: Path) -> None:
    body: dict[str, Any] = {"defaultProfile": "main", "profiles": {"main": {"routingStrategy": "throughput"}}}
    router = make_router(load_profiles(write(tmp_path, body)), "least-kv-cache")
    assert router.select(req("x"), REPLICAS, NOW).strategy == "throughput"
    assert router.select(req("x", strategy_header="least-request"), REPLICAS, NOW).strategy == "least-request"
    body["lockedRoutingStrategy"] = "prefix-cache:2, least-request"
    router.set_profiles(load_profiles(write(tmp_path, body)))
    locked = router.select(req("x", strategy_header="least-request"), REPLICAS, NOW)
    assert locked.strategy == "prefix-cache:2,least-request:1"
    # A profile without a strategy falls to the pool's default, then to the built-in chain.
    body = {"profiles": {"default": {"requestsPerSecond": 100}}}
    assert make_router(load_profiles(write(tmp_path, body)), "least-kv-cache").select(
        req("x"), REPLICAS, NOW
    ).strategy == ("least-kv-cache")
    no_profiles = make_router(None, None).select(req("x"), REPLICAS, NOW)
    assert (no_profiles.strategy, no_profiles.profile) == (DEFAULT_STRATEGY, None)


def test_unknown_profile_name_falls_back_to_the_default(tmp_path: Path) -> None:
    body = {"profiles": {"default": {"routingStrategy": "throughput"}, "x": {"routingStrategy": "random"}}}
    router = make_router(load_profiles(write(tmp_path, body)), None)
    assert router.select(req("x", profile_header="nope"), REPLICAS, NOW).profile == "default"
    assert router.select(req("x", profile_header=" x "), REPLICAS, NOW).profile == "x"


def test_bad_strategy_header_is_aibrix_400(tmp_path: Path) -> None:
    router = make_router(None, None)
    with pytest.raises(RoutingError) as info:
        router.select(req("x", strategy_header="least-request:40,nope"), REPLICAS, NOW)
    err = info.value
    assert (err.status, err.error_type) == (400, "invalid_request_error")
    assert err.message == "incorrect routing strategy least-request:40,nope"
    assert ("x-error-routing", "true") in err.headers


PROMPT_BUCKETS = {
    "defaultProfile": "default",
    "profiles": {
        "default": {"routingStrategy": "least-request"},
        "short": {"routingStrategy": "throughput", "routingConfig": {"promptLenBucketMaxLength": 100}},
        "mid": {
            "routingStrategy": "least-kv-cache",
            "routingConfig": {"promptLenBucketMinLength": 101, "promptLenBucketMaxLength": 1000},
        },
        "long": {"routingStrategy": "prefix-cache", "routingConfig": {"promptTokensGte": 1001}},
        "long-gen": {
            "routingStrategy": "random",
            "routingConfig": {"promptTokensGte": 1001, "maxTokensGte": 500, "maxTokensLt": 1000},
        },
    },
}


def text_of_tokens(tokens: int) -> str:
    """RouteRequest estimates len // 4 + 1 tokens."""
    return "x" * ((tokens - 1) * 4)


@pytest.mark.parametrize(
    ("tokens", "max_tokens", "profile"),
    [
        (1, None, "short"),
        (100, None, "short"),
        (101, None, "mid"),
        (1000, None, "mid"),
        (1001, None, "long"),
        (1001, 499, "long"),
        (1001, 500, "long-gen"),
        (5000, 999, "long-gen"),
        (5000, 1000, "long"),
    ],
)
def test_auto_picks_the_most_specific_match_at_bucket_boundaries(
    tmp_path: Path, tokens: int, max_tokens: int | None, profile: str
) -> None:
    router = make_router(load_profiles(write(tmp_path, PROMPT_BUCKETS)), None)
    r = req(text_of_tokens(tokens), max_tokens=max_tokens, profile_header="auto")
    assert r.prompt_tokens == tokens
    assert router.select(r, REPLICAS, NOW).profile == profile


def test_unbounded_max_length_zero(tmp_path: Path) -> None:
    body = {
        "profiles": {
            "default": {},
            "big": {"routingConfig": {"promptLenBucketMinLength": 10, "promptLenBucketMaxLength": 0}},
        }
    }
    router = make_router(load_profiles(write(tmp_path, body)), None)
    assert router.select(req(text_of_tokens(10**6), profile_header="auto"), REPLICAS, NOW).profile == "big"
    assert router.select(req(text_of_tokens(9), profile_header="auto"), REPLICAS, NOW).profile == "default"


def test_older_top_level_bucket_fields_load_with_a_warning(tmp_path: Path) -> None:
    body = {
        "profiles": {
            "default": {"routingStrategy": "least-request"},
            "old": {"routingStrategy": "throughput", "promptLenBucketMinLength": 50, "combined": True},
        }
    }
    profiles = load_profiles(write(tmp_path, body))
    assert any("old.promptLenBucketMinLength" in w and "older" in w for w in profiles.warnings)
    assert any("old.combined" in w for w in profiles.warnings)
    router = make_router(profiles, None)
    assert router.select(req(text_of_tokens(60), profile_header="auto"), REPLICAS, NOW).profile == "old"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b"{not json", "not valid JSON"),
        ([], "$: expected a JSON object"),
        ({"defaultProfile": "x"}, "$.profiles: missing"),
        ({"profiles": []}, "$.profiles: expected an object"),
        ({"profiles": {"a": 3}}, "$.profiles.a: expected an object"),
        ({"profiles": {"a": {"routingStrategy": 5}}}, "$.profiles.a.routingStrategy: expected a string"),
        ({"profiles": {"a": {"routingStrategy": "least-reqest"}}}, "$.profiles.a.routingStrategy: unknown"),
        ({"profiles": {"a": {"routingStrategy": "random,least-request"}}}, "cannot be combined"),
        ({"profiles": {"a": {"requestsPerSecond": -1}}}, "$.profiles.a.requestsPerSecond"),
        ({"profiles": {"a": {"requestsPerSecond": "5"}}}, "$.profiles.a.requestsPerSecond"),
        ({"profiles": {"a": {"routingConfig": []}}}, "$.profiles.a.routingConfig: expected an object"),
        ({"profiles": {"a": {"routingConfig": {"maxTokensGte": "9"}}}}, "routingConfig.maxTokensGte"),
        ({"profiles": {"a": {"routingConfig": {"promptTokensGte": True}}}}, "routingConfig.promptTokensGte"),
        (
            {
                "profiles": {
                    "a": {"routingConfig": {"promptLenBucketMinLength": 9, "promptLenBucketMaxLength": 3}}
                }
            },
            "promptLenBucketMaxLength: 3 is below",
        ),
        ({"profiles": {"a": {"routingConfig": {"maxTokensGte": 9, "maxTokensLt": 9}}}}, "maxTokensLt"),
        ({"defaultProfile": "b", "profiles": {"a": {}}}, "$.defaultProfile: no profile named 'b'"),
        ({"lockedRoutingStrategy": "nope", "profiles": {}}, "$.lockedRoutingStrategy: unknown"),
    ],
)
def test_a_broken_file_is_a_clear_error(tmp_path: Path, data: Any, field: str) -> None:
    path = write(tmp_path, data)
    with pytest.raises(ProfileError) as info:
        load_profiles(path)
    message = str(info.value)
    assert message.startswith(str(path)) and field in message, message


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read"):
        load_profiles(tmp_path / "absent.json")


def test_reload_keeps_rate_limit_state_and_reports_file_changes(tmp_path: Path) -> None:
    body = {"profiles": {"default": {"routingStrategy": "least-request", "requestsPerSecond": 1}}}
    path = write(tmp_path, body)
    profiles = load_profiles(path)
    assert profiles.stamp == file_stamp(path)
    router = make_router(profiles, None)
    router.select(req("x"), REPLICAS, NOW)
    router.set_profiles(load_profiles(path))
    with pytest.raises(RoutingError):
        router.select(req("x"), REPLICAS, NOW)
    body["profiles"]["default"]["requestsPerSecond"] = 100
    write(tmp_path, body)
    assert file_stamp(path) != profiles.stamp
    router.set_profiles(load_profiles(path))
    assert router.select(req("x"), REPLICAS, NOW).profile == "default"


def test_unknown_fields_are_reported_not_silently_ignored(tmp_path: Path) -> None:
    body = {"extra": 1, "profiles": {"default": {"colour": "red", "routingConfig": {"foo": 1}}}}
    warnings = load_profiles(write(tmp_path, body)).warnings
    assert any("$.extra" in w for w in warnings)
    assert any("default.colour" in w for w in warnings)
    assert any("routingConfig.foo" in w for w in warnings)


def test_example_profiles_in_deploy_load() -> None:
    examples = sorted((Path(__file__).resolve().parent.parent / "deploy" / "profiles").glob("*.json"))
    assert examples
    for path in examples:
        profiles = load_profiles(path)
        assert profiles.profiles and not profiles.warnings, (path, profiles.warnings)
