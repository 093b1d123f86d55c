"""The sidecar's own status endpoint (`GET /status`, `GET /health`) and its text rendering.

Shows gangs with their state and failure reason, members with pid and address, and per target the
generation it has acknowledged; `GET /history` lists stopped gangs too. Read-only and token-free, so it
listens on 127.0.0.1 by default.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web


class MemberStatus(msgspec.Struct):
    id: str
    role: str
    url: str
    pid: int | None
    gpus: list[str]
    serves: bool


class GangStatus(msgspec.Struct):
    id: str
    service: str
    state: str
    reason: str
    incarnation: int
    failures: int
    members: list[MemberStatus]
    failed_at: float | None = None
    """When the last failure was acted on (its members already killed), Unix time."""


class ServiceStatus(msgspec.Struct):
    name: str
    model: str
    desired: int
    autoscale: dict[str, Any] | None


class TargetView(msgspec.Struct):
    kind: str
    url: str
    reachable: bool
    acked_generation: int | None
    remote_generation: int | None
    last_error: str
    last_ok_at: float | None


class SidecarStatus(msgspec.Struct):
    generation: int
    pid: int
    time: float
    services: list[ServiceStatus]
    gangs: list[GangStatus]
    targets: list[TargetView]


def build_status_app(
    snapshot: Callable[[], SidecarStatus], history: Callable[[int], list[Any]]
) -> web.Application:
    async def status(_: web.Request) -> web.Response:
        return web.Response(body=msgspec.json.encode(snapshot()), content_type="application/json")

    async def past(request: web.Request) -> web.Response:
        """Every gang ever started, stopped ones included (soft-deleted rows), newest first."""
        try:
            limit = max(1, min(1000, int(request.query.get("limit", "100"))))
        except ValueError:
            return web.json_response({"error": "limit must be an integer"}, status=400)
        return web.Response(body=msgspec.json.encode(history(limit)), content_type="application/json")

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/status", status)
    app.router.add_get("/health", health)
    app.router.add_get("/history", past)
    return app


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]
    ]


def render_text(st: SidecarStatus) -> str:
    """What `llm-gateway sidecar status` prints: three aligned tables."""
    lines = [f"generation {st.generation}   sidecar pid {st.pid}", ""]
    rows = []
    for svc in st.services:
        auto = "-"
        if svc.autoscale:
            auto = f"{svc.autoscale.get('action')} (demand {svc.autoscale.get('demand', 0):.1f})"
        rows.append([svc.name, svc.model, str(svc.desired), auto])
    lines += [*_table(["SERVICE", "MODEL", "DESIRED", "AUTOSCALE"], rows), ""]
    rows = []
    for gang in st.gangs:
        members = " ".join(f"{m.id}@{m.url}(pid {m.pid})" for m in gang.members) or "-"
        rows.append(
            [gang.id, gang.state, str(gang.incarnation), str(gang.failures), members, gang.reason or "-"]
        )
    lines += [*_table(["GANG", "STATE", "INCARNATION", "FAILURES", "MEMBERS", "REASON"], rows), ""]
    rows = []
    now = time.time()
    for t in st.targets:
        acked = "-" if t.acked_generation is None else str(t.acked_generation)
        ok = f" (ok {now - t.last_ok_at:.0f}s ago)" if t.last_ok_at else ""
        rows.append([t.kind, t.url, ("yes" if t.reachable else "no") + ok, acked, t.last_error or "-"])
    lines += _table(["TARGET", "URL", "REACHABLE", "ACKED-GENERATION", "LAST-ERROR"], rows)
    return "\n".join(lines) + "\n"
