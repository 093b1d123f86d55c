"""Routing decisions: pure functions over replica snapshots. Imports nothing of `gateway`, no I/O."""

from pathlib import Path

from policies.compiled import check_fresh

check_fresh(Path(__file__).parent)
