"""Sidecar configuration: the desired state, as msgspec structs loaded from YAML/JSON.

A bad file fails at start with file, field and reason, e.g.
`sidecar.yaml: $.services[0]: replicas: 25 is above the hard cap of 20 per service`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import msgspec

from gateway.config import ConfigError, Engine, load_struct, parse_hostport
from gateway.sidecar.providers.ray_config import RayProviderConfig

MAX_REPLICAS = 20
"""Hard cap of engine replicas (gangs) per service, whatever `replicas` or `autoscale.max_replicas` say."""

PLACEHOLDERS = (
    "host",
    "port",
    "gpus",
    "model",
    "python",
    "id",
    "role",
    "rank",
    "gang",
    "peer_host",
    "peer_port",
)
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
_FIELD = re.compile(r"{([a-z_]+)}")


def _check_template(template: str, where: str) -> None:
    for name in _FIELD.findall(template):
        if name not in PLACEHOLDERS:
            raise ValueError(f"{where}: unknown placeholder {{{name}}} (known: {', '.join(PLACEHOLDERS)})")


class RoleSpec(msgspec.Struct, forbid_unknown_fields=True):
    """One role inside a gang, e.g. the HTTP-serving head and its tensor-parallel workers."""

    role: str = "engine"
    count: int = 1
    """Members of this role per gang."""
    gpus: int = 0
    """GPUs per member, taken from the configured inventory and passed as `CUDA_VISIBLE_DEVICES`."""
    serves: bool = True
    """Members of this role take requests: each becomes one replica on the gateways."""
    command: str | None = None
    """Overrides the service's command template for this role."""
    health: bool = True
    """Check members of this role over HTTP at the service's `health_path`; false: process liveness only
    (for members that serve no HTTP, e.g. tensor-parallel workers that join a head)."""
    env: dict[str, str] = {}
    """Added to the service's env for this role."""

    def __post_init__(self) -> None:
        if not _NAME.match(self.role):
            raise ValueError(f"role: {self.role!r} must be lowercase letters, digits, - or _ (at most 40)")
        if self.count < 1:
            raise ValueError(f"count: must be >= 1, got {self.count}")
        if self.gpus < 0:
            raise ValueError(f"gpus: must be >= 0, got {self.gpus}")
        if self.command is not None:
            _check_template(self.command, "command")


class GangSpec(msgspec.Struct, forbid_unknown_fields=True):
    """The members started and stopped as one (one engine replica of the service)."""

    members: list[RoleSpec] = msgspec.field(default_factory=lambda: [RoleSpec()])

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("members: a gang needs at least one role")
        roles = [m.role for m in self.members]
        if len(set(roles)) != len(roles):
            raise ValueError(f"members: role names must be unique, got {roles}")
        if not any(m.serves for m in self.members):
            raise ValueError("members: at least one role must have serves: true")

    @property
    def size(self) -> int:
        return sum(m.count for m in self.members)

    @property
    def gpus(self) -> int:
        return sum(m.count * m.gpus for m in self.members)


class AutoscaleSpec(msgspec.Struct, forbid_unknown_fields=True):
    """Replica count from the in-flight requests the gateways report (`/admin/v1/stats`)."""

    min_replicas: int = 1
    max_replicas: int = 4
    target_in_flight: float = 8.0
    """Wanted in-flight plus queued requests per engine replica, summed over gateway replicas."""
    interval_s: float = 5.0
    up_cooldown_s: float = 30.0
    """Least time after any scale event before scaling up again."""
    down_cooldown_s: float = 120.0
    """Least time after any scale event before scaling down again."""

    def __post_init__(self) -> None:
        if self.min_replicas < 0:
            raise ValueError(f"autoscale.min_replicas: must be >= 0, got {self.min_replicas}")
        if self.max_replicas > MAX_REPLICAS:
            raise ValueError(
                f"autoscale.max_replicas: {self.max_replicas} is above the hard cap of {MAX_REPLICAS}"
                " per service"
            )
        if self.max_replicas < max(1, self.min_replicas):
            raise ValueError(
                f"autoscale.max_replicas: must be >= max(1, min_replicas), got {self.max_replicas}"
            )
        if self.target_in_flight <= 0:
            raise ValueError(f"autoscale.target_in_flight: must be > 0, got {self.target_in_flight}")
        if self.interval_s <= 0:
            raise ValueError(f"autoscale.interval_s: must be > 0, got {self.interval_s}")


class ServiceSpec(msgspec.Struct, forbid_unknown_fields=True):
    """One model served by a set of identical engine replicas (gangs)."""

    name: str
    """Short name; gang ids are `NAME-N`, replica ids on the gateways `NAME-N.INCARNATION.ROLEK`."""
    model: str
    """Model name clients send (`model` in the request) and the `{model}` placeholder."""
    command: str
    """Command template run per member. Placeholders: {host} {port} {gpus} {model} {python} {id} {role}
    {rank} {gang} {peer_host} {peer_port} ({peer_*}: the gang's first member, e.g. a distributed head)."""
    engine: Engine = "vllm"
    """Engine dialect, passed to the gateways (their metrics scraping) and sglang-router targets."""
    env: dict[str, str] = {}
    health_path: str = "/health"
    capacity: int = 64
    """Concurrent requests one serving member takes in total; shared out among gateway replicas."""
    replicas: int = 1
    """Gangs to run (the starting count when `autoscale` is set). Hard cap: 20."""
    gang: GangSpec = msgspec.field(default_factory=GangSpec)
    autoscale: AutoscaleSpec | None = None
    labels: dict[str, str] = {}
    """Passed to the gateways with each replica."""
    startup_timeout_s: float = 120.0
    """Every member must answer its health path within this, or the gang fails."""
    health_interval_s: float = 2.0
    health_timeout_s: float = 2.0
    unhealthy_threshold: int = 2
    """Consecutive failed health checks of one running member that fail its gang."""
    max_restarts: int = 5
    """Gang failures (counted once per gang) before the gang is FAILED and left down."""
    backoff_base_s: float = 1.0
    """Wait before the first restart; doubles per failure up to `backoff_max_s`."""
    backoff_max_s: float = 60.0
    stop_grace_s: float = 10.0
    """After SIGTERM, how long a member may take before SIGKILL."""
    drain_grace_s: float = 60.0
    """Longest wait for the gateways' in-flight requests of a draining replica before it is stopped."""
    stable_after_s: float = 300.0
    """A gang serving this long without a failure has its failure count reset."""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"name: {self.name!r} must be lowercase letters, digits, - or _ (at most 40)")
        if not self.model:
            raise ValueError("model: must not be empty")
        _check_template(self.command, "command")
        if not self.health_path.startswith("/"):
            raise ValueError(f"health_path: must start with /, got {self.health_path!r}")
        if self.capacity < 1:
            raise ValueError(f"capacity: must be >= 1, got {self.capacity}")
        if self.replicas < 0:
            raise ValueError(f"replicas: must be >= 0, got {self.replicas}")
        if self.replicas > MAX_REPLICAS:
            raise ValueError(f"replicas: {self.replicas} is above the hard cap of {MAX_REPLICAS} per service")
        if self.autoscale is not None and not (
            self.autoscale.min_replicas <= self.replicas <= self.autoscale.max_replicas
        ):
            raise ValueError(
                f"replicas: {self.replicas} must lie within autoscale.min_replicas.."
                f"max_replicas ({self.autoscale.min_replicas}..{self.autoscale.max_replicas})"
            )
        for field in ("startup_timeout_s", "health_interval_s", "health_timeout_s", "backoff_base_s"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field}: must be > 0")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts: must be >= 0, got {self.max_restarts}")
        if self.unhealthy_threshold < 1:
            raise ValueError(f"unhealthy_threshold: must be >= 1, got {self.unhealthy_threshold}")

    def template_for(self, role: RoleSpec) -> str:
        return role.command if role.command is not None else self.command


class GatewayTarget(msgspec.Struct, forbid_unknown_fields=True):
    """The admin endpoint of one gateway replica."""

    admin_url: str
    """e.g. http://127.0.0.1:9000 (no path)."""
    token: str | None = None
    """Bearer token; prefer `token_env` or `token_file` outside of examples."""
    token_env: str | None = None
    """Environment variable holding the token."""
    token_file: str | None = None

    def __post_init__(self) -> None:
        if not self.admin_url.startswith(("http://", "https://")):
            raise ValueError(f"admin_url: must start with http:// or https://, got {self.admin_url!r}")

    def resolve_token(self) -> str | None:
        if self.token_env:
            value = os.environ.get(self.token_env)
            if value:
                return value.strip()
        if self.token_file:
            try:
                return Path(self.token_file).read_text().strip() or None
            except OSError as exc:
                raise ConfigError(f"gateways: cannot read token_file {self.token_file}: {exc}") from exc
        return self.token


class SglangRouterTarget(msgspec.Struct, forbid_unknown_fields=True):
    """An external SGLang router whose worker list the sidecar keeps right (`/workers` API)."""

    url: str
    """e.g. http://127.0.0.1:30000 (no path)."""
    services: list[str] | None = None
    """Services whose serving members are registered (None: every service)."""
    api_key: str | None = None
    """Sent as a bearer token when the router was started with `--api-key`."""

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url: must start with http:// or https://, got {self.url!r}")


class SyncSpec(msgspec.Struct, forbid_unknown_fields=True):
    """The reconcile loop towards gateways and routers."""

    interval_s: float = 2.0
    """Each target is re-checked this often even when nothing changed (a restarted gateway converges)."""
    timeout_s: float = 3.0
    """Per admin request."""
    max_response_bytes: int = 4 * 1024 * 1024
    """Longer admin responses are an error, never read whole."""
    unreachable_after: int = 2
    """Consecutive failed rounds before a gateway no longer counts for slot shares."""


class SidecarConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The whole desired state of one sidecar."""

    services: list[ServiceSpec] = []
    gateways: list[GatewayTarget] = []
    sglang_routers: list[SglangRouterTarget] = []
    gpus: list[str] = []
    """Local GPU inventory (device ids for `CUDA_VISIBLE_DEVICES`); empty on machines without GPUs."""
    host: str = "127.0.0.1"
    """Address engines bind to and gateways reach them at."""
    state_dir: str = "./sidecar-state"
    """SQLite state (`sidecar.db`) and member logs (`logs/`)."""
    status_listen: str = "127.0.0.1:9100"
    """The sidecar's own status endpoint (`GET /status`, `GET /health`)."""
    sync: SyncSpec = msgspec.field(default_factory=SyncSpec)
    provider: Literal["local", "ray"] = "local"
    """Where members run: `local` subprocesses here, or `ray` actors on an existing Ray cluster."""
    ray: RayProviderConfig = msgspec.field(default_factory=RayProviderConfig)
    """The Ray cluster and how gangs are placed on it (with `provider: ray`)."""

    def __post_init__(self) -> None:
        parse_hostport(self.status_listen, "status_listen")
        names = [s.name for s in self.services]
        if len(set(names)) != len(names):
            raise ValueError(f"services: names must be unique, got {names}")
        if len(set(self.gpus)) != len(self.gpus):
            raise ValueError(f"gpus: device ids must be unique, got {self.gpus}")
        urls = [g.admin_url.rstrip("/") for g in self.gateways]
        if len(set(urls)) != len(urls):
            raise ValueError("gateways: admin_url appears twice")
        for router in self.sglang_routers:
            for name in router.services or []:
                if name not in names:
                    raise ValueError(f"sglang_routers: unknown service {name!r}")
        for name in self.ray.services:
            if name not in names:
                raise ValueError(f"ray.services: unknown service {name!r}")
        for service in self.services:
            need = service.gang.gpus
            if self.provider == "local" and need > len(self.gpus):
                raise ValueError(
                    f"services: {service.name!r} needs {need} GPUs per gang,"
                    f" the inventory has {len(self.gpus)}"
                )


def load_sidecar_config(path: str | os.PathLike[str]) -> SidecarConfig:
    return load_struct(path, SidecarConfig)
