"""Data path benchmark: direct vs mesh (two sidecars, mTLS) vs nginx and haproxy 2-hop.

Run ``python -m bench [--quick] [--json FILE] [--keep-dir]`` (``make bench``). The method and
its pitfalls are in ``../shared/BENCH.md``; every figure is taken in one run against one backend,
so compare the ratios, not the absolute numbers, across runs.
"""
