"""Observability that is optional: OpenTelemetry traces (``tracing``)."""
