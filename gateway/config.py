"""Gateway configuration: msgspec structs with defaults, loaded from YAML or JSON.

A bad file fails at start with the file, the field and the reason, e.g.
`gateway.yaml: $.pools[0].replicas[1].capacity: Expected `int`, got `str``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, TypeVar

import msgspec
import yaml

Engine = Literal["vllm", "sglang", "llamacpp", "openai"]
T = TypeVar("T")


class ConfigError(Exception):
    """A configuration problem, already phrased for the operator (file, field, reason)."""


def parse_hostport(value: str, field: str = "listen") -> tuple[str, int]:
    """`HOST:PORT` or `[v6]:PORT` into a pair; port 0 means "any free port"."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{field}: expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class ReplicaConfig(msgspec.Struct, forbid_unknown_fields=True):
    """One engine replica serving a pool's model."""

    id: str
    """Stable name; shows up in metrics, logs and the `x-gateway-replica` response header."""
    url: str
    """Base URL of the engine, e.g. http://10.0.0.5:8000 (no path)."""
    engine: Engine = "vllm"
    """Metrics dialect to scrape; `openai` means an endpoint without engine metrics."""
    capacity: int = 64
    """Concurrent requests this gateway replica may have in flight on it (its slot share)."""
    labels: dict[str, str] = {}
    draining: bool = False
    """A draining replica gets no new requests; in-flight ones finish."""

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("id must not be empty")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")


class PoolConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The replicas serving one model name."""

    model: str
    replicas: list[ReplicaConfig] = []
    profiles: str | None = None
    """Routing-profile JSON file (AIBrix format) for this model; overrides `routing.profiles`."""
    default_strategy: str | None = None
    """Strategy when neither header nor profile names one; overrides `routing.default_strategy`."""


class HealthConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Active health checks of every replica."""

    path: str = "/health"
    interval_s: float = 2.0
    timeout_s: float = 1.0
    healthy_threshold: int = 1
    """Consecutive successes that bring a replica back."""
    unhealthy_threshold: int = 2
    """Consecutive failures that take a replica out of rotation."""


class ScrapeConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Scraping of each replica's engine `/metrics`."""

    enabled: bool = True
    interval_s: float = 1.0
    timeout_s: float = 1.0
    stale_after_s: float = 5.0
    """A snapshot older than this is unknown to the scorers, not zero."""


class QueueConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The per-pool FIFO wait when every slot of every candidate is taken."""

    max_size: int = 1024
    """Waiting requests per pool; beyond it a request gets 429 at once."""
    timeout_s: float = 30.0
    """Longest wait for a slot; then 429 with Retry-After."""


class RetryConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Failover before the first response byte, and passive health (ejection)."""

    max_attempts: int = 3
    """Replicas tried per request (the first one included)."""
    backoff_base_s: float = 0.02
    backoff_max_s: float = 0.5
    eject_after_failures: int = 3
    """Consecutive connect/first-byte failures that eject a replica."""
    eject_base_s: float = 2.0
    """First ejection length; doubles on each further ejection up to `eject_max_s`."""
    eject_max_s: float = 60.0


class TimeoutConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Upstream and client timeouts, in seconds."""

    connect_s: float = 2.0
    first_byte_s: float = 120.0
    """From sending the request to the upstream's response head."""
    idle_s: float = 120.0
    """Longest silence between two upstream body chunks."""
    total_s: float = 900.0
    client_header_s: float = 10.0
    """A client must send a complete request head within this (slowloris defence)."""
    client_idle_s: float = 75.0
    """Keep-alive connections with no request for this long are closed."""
    client_body_s: float = 60.0


class LimitsConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Limits on what clients may send."""

    max_body_bytes: int = 32 * 1024 * 1024
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100


class AdminConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The admin listener: never reachable through the public one."""

    listen: str = "127.0.0.1:9000"
    token_file: str | None = None
    """File holding the bearer token; `LLM_GATEWAY_ADMIN_TOKEN` takes precedence."""
    metrics_public: bool = False
    """Serve the admin `/metrics` without the token (for a Prometheus without credentials)."""


class RoutingConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Defaults for every pool."""

    profiles: str | None = None
    """Routing-profile JSON file (AIBrix format) for pools that name none."""
    default_strategy: str | None = None
    """Strategy when neither header nor profile names one (None: the built-in default chain)."""


class AccessLogConfig(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool = True
    sample_rate: float = 1.0
    """Fraction of successful requests logged; errors are always logged."""


class GatewayConfig(msgspec.Struct, forbid_unknown_fields=True):
    """One gateway replica."""

    listen: str = "127.0.0.1:8000"
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    pools: list[PoolConfig] = []
    health: HealthConfig = msgspec.field(default_factory=HealthConfig)
    scrape: ScrapeConfig = msgspec.field(default_factory=ScrapeConfig)
    queue: QueueConfig = msgspec.field(default_factory=QueueConfig)
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    timeouts: TimeoutConfig = msgspec.field(default_factory=TimeoutConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    access_log: AccessLogConfig = msgspec.field(default_factory=AccessLogConfig)
    shutdown_grace_s: float = 30.0
    """On SIGTERM, how long in-flight requests may run before they are cancelled."""

    def __post_init__(self) -> None:
        parse_hostport(self.listen, "listen")
        parse_hostport(self.admin.listen, "admin.listen")
        seen_models: set[str] = set()
        seen_ids: set[str] = set()
        for pool in self.pools:
            if pool.model in seen_models:
                raise ValueError(f"pools: model {pool.model!r} appears twice")
            seen_models.add(pool.model)
            for replica in pool.replicas:
                if replica.id in seen_ids:
                    raise ValueError(f"pools: replica id {replica.id!r} appears twice")
                seen_ids.add(replica.id)

    def admin_token(self) -> str | None:
        token = os.environ.get("LLM_GATEWAY_ADMIN_TOKEN")
        if token:
            return token.strip()
        if self.admin.token_file:
            try:
                return Path(self.admin.token_file).read_text().strip() or None
            except OSError as exc:
                raise ConfigError(f"admin.token_file: cannot read {self.admin.token_file}: {exc}") from exc
        return None


def load_struct(path: str | os.PathLike[str], kind: type[T]) -> T:
    """Read YAML/JSON at `path` into `kind`, turning every failure into one ConfigError line."""
    text_path = str(path)
    try:
        raw = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{text_path}: cannot read: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{text_path}: not valid YAML/JSON: {exc}") from exc
    if data is None:
        data = {}
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{text_path}: {_field_first(str(exc))}") from exc


def _field_first(message: str) -> str:
    """msgspec says `reason - at `$.a.b``; operators read the field first."""
    reason, sep, where = message.rpartition(" - at ")
    if not sep:
        return f"$: {message}"
    return f"{where.strip('`')}: {reason}"


def load_gateway_config(path: str | os.PathLike[str]) -> GatewayConfig:
    return load_struct(path, GatewayConfig)


class ReplicaSpec(msgspec.Struct, forbid_unknown_fields=True):
    """One replica in the admin API's desired set (what the sidecar PUTs)."""

    id: str
    model: str
    url: str
    engine: Engine = "vllm"
    capacity: int = 64
    labels: dict[str, str] = {}
    draining: bool = False

    def __post_init__(self) -> None:
        ReplicaConfig(self.id, self.url, self.engine, self.capacity, self.labels, self.draining)


class ReplicaSet(msgspec.Struct, forbid_unknown_fields=True):
    """Body of `PUT /admin/v1/replicas`: the full desired set, applied atomically."""

    generation: int
    replicas: list[ReplicaSpec]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for spec in self.replicas:
            if spec.id in seen:
                raise ValueError(f"replica id {spec.id!r} appears twice")
            seen.add(spec.id)


def replica_set_from_config(config: GatewayConfig) -> ReplicaSet:
    """Generation 0: the replicas named in the config file."""
    return ReplicaSet(
        generation=0,
        replicas=[
            ReplicaSpec(r.id, pool.model, r.url, r.engine, r.capacity, dict(r.labels), r.draining)
            for pool in config.pools
            for r in pool.replicas
        ],
    )
