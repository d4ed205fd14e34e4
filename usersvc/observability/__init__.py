"""What operators watch: Prometheus metrics (``metrics``) and the small
hooks the rest of the code calls to feed them (``hooks``); OpenTelemetry
traces (``tracing``), optional (the ``otel`` extra)."""
