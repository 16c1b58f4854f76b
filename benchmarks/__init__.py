"""asv benchmarks for fastce; see docs/benchmarks.md."""
