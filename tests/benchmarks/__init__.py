"""Tests of the benchmark package: measuring code, not the product."""
