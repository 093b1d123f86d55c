"""`llm-gateway sidecar [run|status]`: run the control plane, or print a running one's status."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import msgspec

from gateway.config import ConfigError, parse_hostport
from gateway.sidecar.spec import load_sidecar_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        nargs="?",
        default="run",
        choices=["run", "status"],
        help="run the sidecar (default), or print the status of a running one",
    )
    parser.add_argument("--config", help="sidecar YAML/JSON file (see deploy/sidecar.yaml)")
    parser.add_argument("--state-dir", help="overrides the config's state_dir (SQLite state and member logs)")
    parser.add_argument(
        "--status-listen", help="overrides the config's status_listen, HOST:PORT of the status endpoint"
    )
    parser.add_argument(
        "--stop-on-exit",
        action="store_true",
        help="on SIGTERM/Ctrl-C drain and stop every engine (default: leave them running for the next "
        "sidecar to adopt)",
    )
    parser.add_argument(
        "--url",
        help="status: the sidecar's status endpoint, e.g. http://127.0.0.1:9100 (default: from --config)",
    )
    parser.add_argument("--json", action="store_true", help="status: print the raw JSON")


def _status(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    from gateway.sidecar.status import SidecarStatus, render_text

    url = args.url
    if not url:
        listen = args.status_listen
        if not listen and args.config:
            listen = load_sidecar_config(args.config).status_listen
        host, port = parse_hostport(listen or "127.0.0.1:9100", "status_listen")
        url = f"http://{host}:{port}"
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/status", timeout=5) as resp:
            raw = resp.read(16 * 1024 * 1024)
    except (urllib.error.URLError, OSError) as exc:
        print(f"llm-gateway sidecar status: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(raw.decode() + "\n")
        return 0
    sys.stdout.write(render_text(msgspec.json.decode(raw, type=SidecarStatus)))
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "status":
            return _status(args)
        if not args.config:
            print("llm-gateway sidecar: --config is required", file=sys.stderr)
            return 2
        cfg = load_sidecar_config(args.config)
        if args.state_dir:
            cfg.state_dir = args.state_dir
        if args.status_listen:
            parse_hostport(args.status_listen, "--status-listen")
            cfg.status_listen = args.status_listen
        from gateway.sidecar.controller import configured_provider, run_sidecar

        provider = configured_provider(cfg)
    except (ConfigError, ValueError) as exc:
        print(f"llm-gateway sidecar: {exc}", file=sys.stderr)
        return 2
    from gateway.sidecar.store import StateInUse

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_sidecar(cfg, stop, stop_engines_on_exit=args.stop_on_exit, provider=provider)

    try:
        asyncio.run(main())
    except (OSError, StateInUse) as exc:
        print(f"llm-gateway sidecar: {exc}", file=sys.stderr)
        return 1
    return 0
