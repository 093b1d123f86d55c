"""The control-plane sidecar: provisions engines in gangs and keeps gateways and routers in sync."""
