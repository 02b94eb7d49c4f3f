"""Benchmarks: ``python -m sf_dist.bench NAME`` runs ``sf_dist.bench.NAME.main()``."""
