"""Configuration of the Ray provider (`ray:` in the sidecar config), apart from the provider itself so
that reading a config never needs the optional `ray` package."""

from __future__ import annotations

from typing import Literal

import msgspec

Strategy = Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"]


class RayPlacement(msgspec.Struct, forbid_unknown_fields=True):
    """How the gangs of one service are placed; unset fields take the provider's defaults."""

    strategy: Strategy | None = None
    cpus: float | None = None
    """CPUs reserved per member."""
    resources: dict[str, float] | None = None
    """Custom Ray resources reserved per member, e.g. `{"accelerator_type:H100": 0.001}`."""


class RayProviderConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Where the Ray cluster is and how gangs are placed on it."""

    address: str = "auto"
    """GCS address of the existing cluster (`HEAD_IP:6379`); `auto` reads RAY_ADDRESS or finds a local
    `ray start`."""
    namespace: str = "llm-gateway"
    """Ray namespace of the member actors (and placement groups): adoption looks here."""
    prefix: str = "llmgw-"
    """Placement groups and actors named with this prefix belong to this sidecar, and only to it: leaked
    ones are removed. Give each sidecar sharing a cluster its own."""
    strategy: Strategy = "PACK"
    """Default placement strategy of a gang's bundles (STRICT_PACK: one node; STRICT_SPREAD: one node per
    member)."""
    cpus: float = 1.0
    """CPUs reserved per member; GPUs come from the role's `gpus`."""
    resources: dict[str, float] = {}
    """Custom resources reserved per member."""
    services: dict[str, RayPlacement] = {}
    """Per-service overrides, by service name."""
    placement_timeout_s: float = 30.0
    """Longest wait for the whole placement group; then the gang is pending and retried later."""
    call_timeout_s: float = 30.0
    """Longest wait for an actor to be created and answer."""
    bind_host: str | None = None
    """Address engines bind to on their node; default: the node's IP as Ray knows it."""
    log_dir: str = "/tmp/llm-gateway-ray"
    """Directory on each node for the engines' output (`<member id>.log`)."""

    def __post_init__(self) -> None:
        if not self.prefix:
            raise ValueError("prefix: must not be empty")
        if "/" in self.prefix:
            raise ValueError(f"prefix: must not contain '/', got {self.prefix!r}")
        if self.cpus < 0:
            raise ValueError(f"cpus: must be >= 0, got {self.cpus}")
        for field in ("placement_timeout_s", "call_timeout_s"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field}: must be > 0")

    def placement(self, service: str) -> tuple[Strategy, float, dict[str, float]]:
        over = self.services.get(service, RayPlacement())
        strategy = over.strategy or self.strategy
        cpus = self.cpus if over.cpus is None else over.cpus
        resources = self.resources if over.resources is None else over.resources
        return strategy, cpus, resources
