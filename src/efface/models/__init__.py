"""Loading pipelines and, as methods arrive, selecting their parameters and hooking them."""
