"""Scenarios run against the target chosen with --quantlab-root (the twin by default)."""
