"""The sidecar process: store, provider, gangs, sync loops, autoscalers and the status endpoint, wired."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from pathlib import Path

import aiohttp
import msgspec
from aiohttp import web

from gateway.config import ConfigError, parse_hostport
from gateway.sidecar.autoscale import Autoscaler
from gateway.sidecar.gangs import Fleet
from gateway.sidecar.providers.base import Provider
from gateway.sidecar.providers.local import LocalProvider
from gateway.sidecar.spec import SidecarConfig
from gateway.sidecar.status import (
    GangStatus,
    MemberStatus,
    ServiceStatus,
    SidecarStatus,
    TargetView,
    build_status_app,
)
from gateway.sidecar.store import GangRow, Store
from gateway.sidecar.sync import SyncManager

log = logging.getLogger("gateway.sidecar")


class Sidecar:
    def __init__(
        self,
        cfg: SidecarConfig,
        *,
        stop_engines_on_exit: bool = False,
        engines_die_with_sidecar: bool = False,
        provider: Provider | None = None,
    ) -> None:
        """`provider` defaults to local subprocesses; any object with the Provider API fits (e.g. Ray)."""
        self.cfg = cfg
        self.stop_engines_on_exit = stop_engines_on_exit
        self.state_dir = Path(cfg.state_dir)
        self.store = Store(self.state_dir / "sidecar.db")
        self.provider: Provider = provider or LocalProvider(
            self.state_dir / "logs", cfg.gpus, cfg.host, engines_die_with_sidecar
        )
        self.session: aiohttp.ClientSession | None = None
        self.fleet: Fleet | None = None
        self.sync: SyncManager | None = None
        self.autoscalers: dict[str, Autoscaler] = {}
        self.runner: web.AppRunner | None = None
        self.status_port: int | None = None

    def snapshot(self) -> SidecarStatus:
        assert self.fleet is not None and self.sync is not None
        services = []
        for spec in self.cfg.services:
            scaler = self.autoscalers.get(spec.name)
            decision = msgspec.to_builtins(scaler.last) if scaler is not None and scaler.last else None
            services.append(
                ServiceStatus(
                    spec.name, spec.model, self.fleet.desired.get(spec.name, spec.replicas), decision
                )
            )
        gangs = []
        for gang in sorted(self.fleet.gangs.values(), key=lambda g: (g.row.service, g.seq)):
            members = [
                MemberStatus(
                    m.id,
                    m.role,
                    m.handle.url,
                    int(m.handle.ref["pid"]) if "pid" in m.handle.ref else None,
                    list(m.handle.gpus),
                    m.serves,
                )
                for m in gang.members
            ]
            row = gang.row
            gangs.append(
                GangStatus(
                    row.id,
                    row.service,
                    row.state,
                    row.reason,
                    row.incarnation,
                    row.failures,
                    members,
                    gang.failed_at,
                )
            )
        targets = [
            TargetView(
                t.kind,
                t.url,
                t.reachable,
                t.acked_generation,
                t.remote_generation,
                t.last_error,
                t.last_ok_at,
            )
            for t in self.sync.statuses()
        ]
        return SidecarStatus(self.sync.generation, os.getpid(), time.time(), services, gangs, targets)

    def history(self, limit: int) -> list[GangRow]:
        return self.store.gangs(include_deleted=True)[::-1][:limit]

    async def start(self) -> None:
        self.session = aiohttp.ClientSession()
        self.sync = SyncManager(self.cfg, self.store, self.session)
        self.fleet = Fleet(self.cfg, self.store, self.provider, self.session, self.sync.refresh, self.sync)
        self.sync.source = self.fleet.registrations
        host, port = parse_hostport(self.cfg.status_listen, "status_listen")
        self.runner = web.AppRunner(build_status_app(self.snapshot, self.history), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.status_port = sockets[0].getsockname()[1] if sockets else port
        await self.fleet.start()
        self.sync.start()
        fleet = self.fleet
        for spec in self.cfg.services:
            if spec.autoscale is None:
                continue
            name = spec.name
            scaler = Autoscaler(
                spec,
                current=functools.partial(fleet.desired.__getitem__, name),
                apply=functools.partial(fleet.set_desired, name),
                collect=self.sync.collect_stats,
            )
            scaler.start()
            self.autoscalers[name] = scaler
        log.info(
            "sidecar up: %d service(s), %d gateway(s), %d sglang router(s), status on %s:%d",
            len(self.cfg.services),
            len(self.cfg.gateways),
            len(self.cfg.sglang_routers),
            host,
            self.status_port,
        )

    async def close(self) -> None:
        for scaler in self.autoscalers.values():
            await scaler.close()
        if self.fleet is not None:
            await self.fleet.close(self.stop_engines_on_exit)
        if self.sync is not None:
            if self.stop_engines_on_exit:
                await self.sync.flush(self.cfg.sync.timeout_s)
            await self.sync.close()
        if self.runner is not None:
            await self.runner.cleanup()
        if self.session is not None:
            await self.session.close()
        await self.provider.close()
        self.store.close()


def configured_provider(cfg: SidecarConfig) -> Provider | None:
    """The provider the config asks for; None: the local default."""
    if cfg.provider != "ray":
        return None
    try:
        from gateway.sidecar.providers.ray import RayProvider
    except ImportError as exc:
        raise ConfigError(
            f"provider: ray needs the optional `ray` package: pip install '.[ray]' ({exc})"
        ) from exc
    return RayProvider(cfg.ray)


async def run_sidecar(
    cfg: SidecarConfig,
    stop: asyncio.Event,
    *,
    stop_engines_on_exit: bool = False,
    provider: Provider | None = None,
) -> None:
    sidecar = Sidecar(cfg, stop_engines_on_exit=stop_engines_on_exit, provider=provider)
    try:
        await sidecar.start()
        await stop.wait()
        log.info("sidecar stopping (%s engines)", "stopping" if stop_engines_on_exit else "leaving")
    finally:
        await sidecar.close()
