"""Slow, independent references (pure Python / dense) that the tests and the benchmarks compare xtok
with; also usable to check a set-up by hand. Never used on a training path."""
