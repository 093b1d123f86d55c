"""The provider interface: launch a whole gang, stop it, tell whether a member is alive, and where.

A gang is launched as one call so that a provider with gang scheduling (Ray placement groups reserve every
bundle atomically; members are actors pinned to a bundle index) can reserve everything or nothing. A
`MemberHandle` is plain data persisted by the sidecar, so that after a restart the same provider can find
the member again (`adopt`): a pid plus its start time for local processes, a named detached actor for Ray.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Protocol

import msgspec

_FIELD = re.compile(r"{([a-z_]+)}")


class LaunchError(Exception):
    """A gang could not be started (nothing of it is left running when this is raised)."""


class Unschedulable(LaunchError):
    """Not enough free resources (GPUs) for the gang right now: it waits, and this is no failure."""


class MemberLaunch(msgspec.Struct):
    """What to run for one member of a gang."""

    member_id: str
    role: str
    rank: int
    """Position of the member in its gang (0 is the first member, `{peer_*}` points at it)."""
    command: str
    """Template with `{host}` `{port}` `{gpus}` `{peer_host}` `{peer_port}` left for the provider."""
    values: dict[str, str]
    """Placeholders already known to the sidecar: model, python, id, role, rank, gang."""
    env: dict[str, str]
    gpus: int = 0


class MemberHandle(msgspec.Struct):
    """A running member, as persisted: enough for the provider that made it to find it again."""

    member_id: str
    provider: str
    host: str
    port: int
    gpus: list[str] = []
    ref: dict[str, str | int] = {}
    """Provider-specific identity (local: pid, pgid, start_time, log)."""

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def render(template: str, values: Mapping[str, str]) -> str:
    """Fill `{name}` placeholders; anything else (JSON braces, unknown names) stays as written."""
    return _FIELD.sub(lambda m: values.get(m.group(1), m.group(0)), template)


class Provider(Protocol):
    name: str

    async def launch(
        self, gang_id: str, members: list[MemberLaunch], on_launched: Callable[[MemberHandle], None]
    ) -> list[MemberHandle]:
        """Start every member, calling `on_launched` for each as soon as it exists (so it is persisted
        before anything else can fail). Raises LaunchError after stopping whatever it started."""
        ...

    async def stop(self, handles: list[MemberHandle], grace_s: float) -> None:
        """Stop the members together: polite signal, then force after `grace_s` (0: force at once)."""
        ...

    async def alive(self, handle: MemberHandle) -> bool:
        """True while the member's process (actor) exists; never raises for a gone member."""
        ...

    async def adopt(self, handle: MemberHandle) -> bool:
        """After a sidecar restart: take back a member started earlier (and its GPUs) if it still runs."""
        ...

    def address(self, handle: MemberHandle) -> tuple[str, int]:
        """Where the member serves HTTP."""
        ...

    def watch_exit(self, handle: MemberHandle, callback: Callable[[], None]) -> None:
        """Call `callback` (on the event loop) as soon as the member exits, if the provider can tell;
        the sidecar also polls `alive`, so this only makes failure detection faster."""
        ...

    async def close(self) -> None: ...
