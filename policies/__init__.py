"""Routing decisions: pure functions over replica snapshots. Imports nothing of `gateway`, no I/O."""
