"""attnmem's benchmarks: pytest-benchmark suites (`pytest bench --benchmark-only`) and the
report command (`python -m bench`), both over the points defined in bench.cases."""
