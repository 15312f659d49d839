"""Accounting, Prometheus metrics, structured logs."""
