"""`llm-gateway serve`: one gateway replica (or N of them sharing the port), wired and run until SIGTERM.

Wiring: config (file or `--upstream` discovery) -> Registry with a router per pool -> Telemetry,
HealthChecker, Scraper, admin listener (aiohttp) -> public listener (raw Protocols). SIGTERM stops
accepting, lets in-flight requests finish for `shutdown_grace_s`, then cancels them (their slots are
released) and exits 0. SIGHUP, or a change of a profile file, reloads routing profiles (a bad file is
rejected and the old one kept).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable

import aiohttp
import msgspec
import uvloop

from gateway.admin import start_admin
from gateway.config import (
    ConfigError,
    GatewayConfig,
    PoolConfig,
    ReplicaConfig,
    load_gateway_config,
    parse_hostport,
    replica_set_from_config,
)
from gateway.health import HealthChecker
from gateway.http_server import HttpServer
from gateway.pool import Registry
from gateway.proxy import Gateway
from gateway.scrape import DiscoveryError, Scraper, discover
from gateway.telemetry import Telemetry
from policies.base import Router
from policies.options import RoutingOptions
from policies.profiles import ProfileError, ProfileSet, file_stamp, load_profiles
from policies.router import ChainRouter, make_router

log = logging.getLogger("gateway.serve")

HOUSEKEEPING_S = 1.0
"""Period of retired-replica reaping, profile-file change checks and routing-metric sync."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--config", metavar="FILE", help="gateway YAML/JSON config (see deploy/gateway.yaml)")
    a(
        "--upstream",
        metavar="URL",
        action="append",
        default=[],
        help="quick form instead of a pool config: an OpenAI server; its model comes from /v1/models and its "
        "engine dialect from /metrics (repeatable)",
    )
    a("--capacity", type=int, default=64, help="slots per --upstream replica (default: %(default)s)")
    a(
        "--discovery-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="how long --upstream discovery keeps retrying an upstream that does not answer yet "
        "(default: %(default)s)",
    )
    a("--listen", metavar="HOST:PORT", help="public listener (overrides the config; default 127.0.0.1:8000)")
    a(
        "--admin-listen",
        metavar="HOST:PORT",
        help="admin listener (overrides the config; default 127.0.0.1:9000); worker i uses PORT+i",
    )
    a(
        "--profiles",
        metavar="FILE",
        help="routing-profile JSON for pools naming none (overrides routing.profiles)",
    )
    a(
        "--workers",
        type=int,
        default=1,
        help="gateway processes sharing the public port through SO_REUSEPORT (default: %(default)s)",
    )
    a(
        "--reuse-port",
        action="store_true",
        help="set SO_REUSEPORT on the public socket, for separately started replicas on one host",
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = _build_config(args)
        _check_profiles(config)
        token = config.admin_token()
    except ConfigError as exc:
        print(f"llm-gateway serve: {exc}", file=sys.stderr)
        return 2
    workers = args.workers
    if workers < 1:
        print("llm-gateway serve: --workers must be >= 1", file=sys.stderr)
        return 2
    if workers == 1:
        return _run_worker(config, token, 0, args.reuse_port)
    if parse_hostport(config.listen)[1] == 0:
        print("llm-gateway serve: --workers needs a fixed public port, not 0", file=sys.stderr)
        return 2
    return _run_workers(config, token, workers)


# -- configuration --------------------------------------------------------------------------------


def _build_config(args: argparse.Namespace) -> GatewayConfig:
    if args.config and args.upstream:
        raise ConfigError("use either --config or --upstream, not both")
    if args.config:
        config = load_gateway_config(args.config)
    elif args.upstream:
        config = GatewayConfig(pools=_discover_pools(args.upstream, args.capacity, args.discovery_timeout))
    else:
        raise ConfigError("nothing to serve: give --config FILE or at least one --upstream URL")
    changes: dict[str, object] = {}
    if args.listen:
        _check_hostport(args.listen, "--listen")
        changes["listen"] = args.listen
    if args.admin_listen:
        _check_hostport(args.admin_listen, "--admin-listen")
        changes["admin"] = msgspec.structs.replace(config.admin, listen=args.admin_listen)
    if args.profiles:
        changes["routing"] = msgspec.structs.replace(config.routing, profiles=args.profiles)
    if changes:
        config = msgspec.structs.replace(config, **changes)
    return config


def _check_hostport(value: str, flag: str) -> None:
    try:
        parse_hostport(value, flag)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _discover_pools(urls: list[str], capacity: int, timeout_s: float) -> list[PoolConfig]:
    """`--upstream URL...`: ask each server for its model and engine; one pool per model.

    An upstream that does not answer yet (an engine still loading) is asked again until `timeout_s`."""

    async def ask_one(session: aiohttp.ClientSession, url: str) -> tuple[str, str]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                return await discover(session, url)
            except DiscoveryError as exc:
                if loop.time() + 1.0 > deadline:
                    raise
                log.warning("%s; retrying", exc)
                await asyncio.sleep(1.0)

    async def ask() -> list[tuple[str, str]]:
        async with aiohttp.ClientSession() as session:
            return list(await asyncio.gather(*(ask_one(session, url) for url in urls)))

    try:
        found = asyncio.run(ask())
    except DiscoveryError as exc:
        raise ConfigError(f"--upstream: {exc}") from None
    pools: dict[str, list[ReplicaConfig]] = {}
    for index, (url, (model, engine)) in enumerate(zip(urls, found, strict=True)):
        try:
            replica = ReplicaConfig(id=f"u{index}", url=url, engine=engine, capacity=capacity)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ConfigError(f"--upstream {url}: {exc}") from None
        pools.setdefault(model, []).append(replica)
        log.info("upstream %s serves model %r (engine %s)", url, model, engine)
    return [PoolConfig(model=model, replicas=replicas) for model, replicas in pools.items()]


def _profile_paths(config: GatewayConfig) -> dict[str, str | None]:
    return {pool.model: pool.profiles or config.routing.profiles for pool in config.pools}


def _check_profiles(config: GatewayConfig) -> None:
    """Fail at start on unusable profile files or default strategies, naming them."""
    paths = {p for p in _profile_paths(config).values() if p}
    if config.routing.profiles:
        paths.add(config.routing.profiles)
    for path in sorted(paths):
        try:
            load_profiles(path)
        except ProfileError as exc:
            raise ConfigError(str(exc)) from None
    strategies = {"routing.default_strategy": config.routing.default_strategy}
    for index, pool in enumerate(config.pools):
        strategies[f"pools[{index}].default_strategy"] = pool.default_strategy
    for field, strategy in strategies.items():
        if strategy:
            try:
                make_router(None, strategy)
            except ValueError as exc:
                raise ConfigError(f"{field}: {exc}") from None


class Routers:
    """One router per pool, built from the pool's profile file; reloads keep the old set on errors."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.options = RoutingOptions(stale_after_s=config.scrape.stale_after_s)
        self.pools = {pool.model: pool for pool in config.pools}
        self.routers: dict[str, ChainRouter] = {}
        self.paths: dict[str, str] = {}
        self.stamps: dict[str, tuple[int, int] | None] = {}
        """The profile file's (mtime, size) when it was last tried, loaded or rejected."""
        self._abstentions: dict[tuple[str, str], int] = {}

    def factory(self, model: str) -> Router:
        pool = self.pools.get(model)
        path = (pool.profiles if pool is not None else None) or self.config.routing.profiles
        profiles: ProfileSet | None = None
        if path:
            self.paths[model] = path
            self.stamps[model] = file_stamp(path)
            try:
                profiles = load_profiles(path)
            except ProfileError as exc:
                log.error("routing profiles for %s not loaded: %s", model, exc)
        strategy = (
            pool.default_strategy if pool is not None else None
        ) or self.config.routing.default_strategy
        router = make_router(profiles, strategy, self.options)
        self.routers[model] = router
        return router

    def reload(self, *, only_changed: bool) -> None:
        """Re-read the profile files (SIGHUP: all of them; the timer: those whose stamp changed)."""
        for model, path in self.paths.items():
            stamp = file_stamp(path)
            if only_changed and stamp == self.stamps.get(model):
                continue
            self.stamps[model] = stamp
            try:
                profiles = load_profiles(path)
            except ProfileError as exc:
                log.error("routing profiles for %s: new file rejected, keeping the old one: %s", model, exc)
                continue
            self.routers[model].set_profiles(profiles)
            log.info("routing profiles for %s reloaded from %s", model, path)

    def sync_abstentions(self, telemetry: Telemetry) -> None:
        """Move the routers' abstention counts into `llm_gateway_routing_abstentions_total`."""
        for model, router in self.routers.items():
            for scorer, total in router.abstentions.items():
                key = (model, scorer)
                delta = total - self._abstentions.get(key, 0)
                if delta > 0:
                    telemetry.abstentions.labels(scorer).inc(delta)
                self._abstentions[key] = total


# -- running --------------------------------------------------------------------------------------


def _run_worker(config: GatewayConfig, token: str | None, index: int, reuse_port: bool) -> int:
    uvloop.install()
    try:
        return asyncio.run(_serve(config, token, index, reuse_port))
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        return 1


def _run_workers(config: GatewayConfig, token: str | None, workers: int) -> int:
    """Fork N workers sharing the public port (SO_REUSEPORT); forward signals; exit when all have."""
    children: list[int] = []
    for index in range(workers):
        pid = os.fork()
        if pid == 0:
            # Until the worker's loop installs its own handlers, a stop request just ends it.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: os._exit(0))
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            code = 1
            try:
                code = _run_worker(config, token, index, True)
            finally:
                logging.shutdown()
                os._exit(code)
        children.append(pid)
    log.info("started %d gateway workers: %s", workers, " ".join(map(str, children)))

    def forward(signum: int, _frame: object) -> None:
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    worst = 0
    remaining = set(children)
    while remaining:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        remaining.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            log.error("worker %d exited with %d", pid, code)
            worst = worst or (code if code > 0 else 1)
            forward(signal.SIGTERM, None)
    return worst


async def _serve(config: GatewayConfig, token: str | None, index: int, reuse_port: bool) -> int:
    loop = asyncio.get_running_loop()
    telemetry = Telemetry(config.access_log)
    routers = Routers(config)
    registry = Registry(routers.factory, queue_max=config.queue.max_size)
    for pool in config.pools:
        registry.pool(pool.model)
    telemetry.attach(registry)
    gateway = Gateway(config, registry, telemetry)
    initial = replica_set_from_config(config)
    registry.apply(initial.generation, initial.replicas)

    health = HealthChecker(registry, config.health, telemetry)
    scraper = Scraper(registry, config.scrape, telemetry)
    server = HttpServer(gateway, config.limits, config.timeouts)
    admin_cfg = config.admin
    if index:
        host, port = parse_hostport(admin_cfg.listen, "admin.listen")
        admin_cfg = msgspec.structs.replace(
            admin_cfg, listen=f"{host}:{port + index}" if port else admin_cfg.listen
        )
    admin = None
    stop = asyncio.Event()
    try:
        await health.start()
        await scraper.start()
        admin = await start_admin(registry, telemetry, admin_cfg, token)
        host, port = parse_hostport(config.listen, "listen")
        await server.start(host, port, reuse_port=reuse_port)
        log.info(
            "gateway%s listening on %s:%d (%d pools, %d replicas)",
            f" worker {index}" if index else "",
            host,
            server.port,
            len(registry.pools),
            sum(1 for _ in registry.replicas()),
        )
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: routers.reload(only_changed=False))
        housekeeping = _every(loop, HOUSEKEEPING_S, lambda: _housekeeping(registry, routers, telemetry))
        try:
            await stop.wait()
        finally:
            housekeeping.cancel()
        log.info(
            "shutting down: no new connections, %d busy, grace %.1fs",
            server.busy_connections(),
            config.shutdown_grace_s,
        )
        server.stop_accepting()
        deadline = loop.time() + config.shutdown_grace_s
        while server.busy_connections() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if server.busy_connections():
            log.warning("grace period over: cancelling %d requests", server.busy_connections())
    finally:
        server.close_all()
        gateway.close()
        telemetry.flush_access_log()
        await health.stop()
        await scraper.stop()
        if admin is not None:
            await admin.cleanup()
    return 0


class _Every:
    def __init__(self) -> None:
        self.handle: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


def _every(loop: asyncio.AbstractEventLoop, period: float, fn: Callable[[], None]) -> _Every:
    timer = _Every()

    def tick() -> None:
        try:
            fn()
        except Exception:
            log.exception("housekeeping failed")
        timer.handle = loop.call_later(period, tick)

    timer.handle = loop.call_later(period, tick)
    return timer


def _housekeeping(registry: Registry, routers: Routers, telemetry: Telemetry) -> None:
    registry.reap_retired()
    routers.reload(only_changed=True)
    routers.sync_abstentions(telemetry)
    telemetry.flush_access_log()
