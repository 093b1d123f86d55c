"""Where the compiled hot path spends its CPU: `perf` samples attributed to the gateway's own functions.

py-spy and cProfile see a mypyc-compiled module as one opaque call. `perf` sees its C functions
(`CPyDef_<module>___<Class>___<method>`), and with DWARF call graphs every sample's stack. This script
charges each sample to the innermost compiled function on its stack, so library work (httptools,
msgspec, dict lookups, allocation) counts against the line of gateway code that asked for it:

    perf record -F 2000 --call-graph dwarf,16384 -o /tmp/hot.data \\
        python loadtests/bench_hotpath.py --scenarios stream --reps 3
    perf script -i /tmp/hot.data | python loadtests/perf_by_function.py
    perf script -i /tmp/hot.data | python loadtests/perf_by_function.py --function Gateway____proxy

The first form lists functions by share of all samples, with the leaf symbols that cost most under
each; `--function` breaks one function down by the calls it makes. Record a running gateway with
`perf record -p PID` instead to include the kernel's share.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator

_COMPILED_PREFIXES = ("CPyDef_", "CPyPy_")


def stacks(lines: Iterable[str]) -> Iterator[list[str]]:
    """Each sample's frames, innermost first, from `perf script` output."""
    frames: list[str] = []
    for line in lines:
        if not line.strip():
            if frames:
                yield frames
            frames = []
        elif line[0] in " \t":
            parts = line.split()
            if len(parts) >= 2:
                frames.append(parts[1].split("+")[0])
        else:
            frames = []
    if frames:
        yield frames


def owner(frames: list[str]) -> tuple[str, int]:
    """The innermost compiled function on the stack (wrappers folded into it) and its index."""
    for i, frame in enumerate(frames):
        if frame.startswith(_COMPILED_PREFIXES):
            return "CPyDef_" + frame.split("_", 1)[1], i
    return "(outside compiled code)", len(frames)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=40, help="rows to print")
    parser.add_argument("--function", default="", help="break down one function (a suffix of its C name)")
    args = parser.parse_args()
    total = 0
    by_owner: Counter[str] = Counter()
    leaves: defaultdict[str, Counter[str]] = defaultdict(Counter)
    calls: Counter[str] = Counter()
    for frames in stacks(sys.stdin):
        total += 1
        name, at = owner(frames)
        by_owner[name] += 1
        leaves[name][frames[0]] += 1
        if args.function and name.endswith(args.function):
            below = [f for f in frames[:at] if not f.startswith("_PyObject_Vectorcall")]
            calls[" < ".join(reversed(below[-3:])) if below else "(its own code)"] += 1
    if not total:
        print("no samples on stdin (pipe `perf script` output in)", file=sys.stderr)
        return 1
    if args.function:
        share = sum(calls.values()) * 100 / total
        print(f"{args.function}: {share:.1f}% of {total} samples; what it calls:")
        for call, n in calls.most_common(args.top):
            print(f"  {n * 100 / total:5.2f}%  {call[:150]}")
        return 0
    print(f"{total} samples; share charged to each compiled function (top leaf symbols under it):")
    for name, n in by_owner.most_common(args.top):
        top = ", ".join(f"{leaf[:36]} {c * 100 / total:.1f}" for leaf, c in leaves[name].most_common(3))
        print(f"{n * 100 / total:5.1f}%  {name[:64]:64s} | {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
