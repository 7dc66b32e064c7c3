"""Benchmarks that drive a real `clipbank serve` from outside: long soaks and hostile traffic."""
