"""Benchmarks of the harness's moving parts (issue 7): `python -m bench.run` or `make bench`; see bench/README.md."""
