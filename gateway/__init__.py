"""LLM gateway: an OpenAI-compatible data plane, its control-plane sidecar and an engine simulator."""

__version__ = "0.1.0"
