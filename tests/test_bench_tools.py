"""The measuring tools in loadtests/ that are not benchmarks of their own: they must keep working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PERF_SCRIPT = """python 123 1.0: 1 cpu-clock:
\t7f01 siphash13+0x1 (libpython)
\t7f02 PyDict_GetItemWithError+0x2 (libpython)
\t7f03 CPyDef_upstream___UpstreamConnection___on_header+0x3 (native)
\t7f04 CPyPy_upstream___UpstreamConnection___on_header+0x4 (native)
\t7f05 llhttp__internal__run+0x5 (parser)
\t7f06 CPyDef_upstream___UpstreamConnection___data_received+0x6 (native)

python 123 1.1: 1 cpu-clock:
\t7f05 llhttp__internal__run+0x5 (parser)
\t7f06 CPyDef_upstream___UpstreamConnection___data_received+0x6 (native)

python 123 1.2: 1 cpu-clock:
\t7f07 uv__io_poll+0x7 (loop)

python 123 1.3: 1 cpu-clock:
\t7f01 siphash13+0x1 (libpython)
\t7f08 CPyPy_upstream___UpstreamConnection___on_header+0x4 (native)
"""


def test_bench_hotpath_relays_every_scenario() -> None:
    """Each scenario's request goes upstream, its answer reaches the client, the connection is reused."""
    out = subprocess.run(
        [sys.executable, str(REPO / "loadtests" / "bench_hotpath.py"), "--requests", "30", "--reps", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr + out.stdout
    header = next(line for line in out.stdout.splitlines() if line.startswith("| variant"))
    assert header == "| variant | chat | stream | stream-chunked |"
    assert sum(line.startswith("| default |") for line in out.stdout.splitlines()) == 1


def test_perf_samples_are_charged_to_the_innermost_compiled_function() -> None:
    tool = REPO / "loadtests" / "perf_by_function.py"
    out = subprocess.run(
        [sys.executable, str(tool)], input=PERF_SCRIPT, capture_output=True, text=True, timeout=60, check=True
    )
    rows = {line.split()[1]: line.split()[0] for line in out.stdout.splitlines()[1:]}
    # The wrapper (CPyPy_) and the function (CPyDef_) are one; library work counts against its caller.
    assert rows["CPyDef_upstream___UpstreamConnection___on_header"] == "50.0%"
    assert rows["CPyDef_upstream___UpstreamConnection___data_received"] == "25.0%"
    assert rows["(outside"] == "25.0%"
    detail = subprocess.run(
        [sys.executable, str(tool), "--function", "UpstreamConnection___on_header"],
        input=PERF_SCRIPT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "50.0% of 4 samples" in detail.stdout
    assert "siphash13" in detail.stdout
