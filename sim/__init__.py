"""Simulators of the systems proxymatic discovers from (test and demo tools, not shipped code)."""
