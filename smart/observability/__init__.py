"""What the on-call engineer sees: metrics, traces, logs, probes and debug endpoints."""
