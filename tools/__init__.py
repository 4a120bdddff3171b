"""Tools around plans: graph export (``nf-graph``) and benchmarks (``nf-bench``)."""

__all__: list[str] = []
