"""Microseconds per `parse_metrics` on each real capture in `../shared/fixtures/metrics/`.

    .venv/bin/python loadtests/bench_parse_metrics.py [--repeat 2000]

The whole scrape path over 512 replicas (HTTP included) is measured by `bench_scrape.py`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.scrape import parse_metrics
from tests.procs import FIXTURES

CASES = [
    ("vllm.txt", "vllm"),
    ("vllm_v0.10.0_real_excerpt.txt", "vllm"),
    ("sglang.txt", "sglang"),
    ("llamacpp.txt", "llamacpp"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    print("parse_metrics, best of 5 runs:")
    for name, engine in CASES:
        data = (FIXTURES / "metrics" / name).read_bytes()
        results = []
        for info in (True, False):
            best = float("inf")
            for _ in range(5):
                started = time.perf_counter()
                for _ in range(args.repeat):
                    parse_metrics(engine, data, 0.0, info=info)
                best = min(best, (time.perf_counter() - started) / args.repeat)
            results.append(best)
        print(
            f"  {name:32s} {len(data):6d} bytes  {results[0] * 1e6:6.1f} us/parse"
            f"  ({results[1] * 1e6:5.1f} us without the static config metrics)"
        )


if __name__ == "__main__":
    main()
