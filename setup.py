"""Build: the hot-path modules are compiled to C extensions with mypyc; everything else stays Python.

The same sources run either way: compiled, per-request Python costs about a third less
(`loadtests/bench_hotpath.py`). `LLM_GATEWAY_COMPILE=0` installs pure Python; a failed compile (no C
compiler, say) also falls back to pure Python, with a warning, instead of failing the install.
Everything else about the package is in pyproject.toml.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

COMPILED = [
    "gateway/access_log.py",
    "gateway/http_server.py",
    "gateway/pool.py",
    "gateway/proxy.py",
    "gateway/telemetry.py",
    "gateway/upstream.py",
    "policies/chain.py",
    "policies/least_kv_cache.py",
    "policies/least_latency.py",
    "policies/least_request.py",
    "policies/least_utilization.py",
    "policies/power_of_two.py",
    "policies/prefix_cache.py",
    "policies/prefix_index.py",
    "policies/random_choice.py",
    "policies/rate_limit.py",
    "policies/rendezvous.py",
    "policies/request.py",
    "policies/router.py",
    "policies/scorer.py",
    "policies/session_affinity.py",
    "policies/text.py",
    "policies/throughput.py",
]
"""Modules on the per-request path. Not here: msgspec Structs (`policies/base.py`, `options.py`,
`gateway/config.py`, `gateway/request_fields.py`: msgspec reads their annotations at run time) and
everything off the hot path."""


class OptionalBuildExt(build_ext):
    """A compile that fails leaves pure Python in place instead of failing the install. All or nothing:
    the per-module extensions import one shared library, so a partial build is removed entirely."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            print(f"warning: mypyc compile failed, installing pure Python: {exc}", file=sys.stderr)
            for ext in self.extensions:
                path = self.get_ext_fullpath(ext.name)
                if os.path.exists(path):
                    os.remove(path)
            self.extensions = []


def extensions() -> list[object]:
    if os.environ.get("LLM_GATEWAY_COMPILE", "1") == "0":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("warning: mypyc not available, installing pure Python", file=sys.stderr)
        return []
    return list(mypycify(COMPILED, opt_level="3", separate=False))


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
