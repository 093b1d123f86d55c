"""LLM gateway: an OpenAI-compatible data plane, its control-plane sidecar and an engine simulator."""

from pathlib import Path

from policies.compiled import check_fresh

__version__ = "0.1.0"

check_fresh(Path(__file__).parent)
