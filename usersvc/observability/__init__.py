"""What operators watch: Prometheus metrics (``metrics``, fed through the
hooks of usersvc/domain/ports.py); OpenTelemetry traces (``tracing``),
optional (the ``otel`` extra); the request id every log line and span
carries (``context``). Nothing here imports the API layer."""
