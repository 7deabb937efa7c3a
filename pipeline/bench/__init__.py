"""Benchmarks behind ``llava-features bench`` (never imported by the product's hot paths)."""
