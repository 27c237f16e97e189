"""Simulated cluster pieces for tests, benchmarks and the demo (Marathon, backends)."""
