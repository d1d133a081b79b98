"""meshward: a zero-trust control plane for Envoy (shared core: policy, telemetry, CLI)."""

__version__ = "0.1.0"
