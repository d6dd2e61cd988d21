"""Benchmarks and chaos scenarios (a package so that `bench.chaos.test_short` imports like the tests do)."""
