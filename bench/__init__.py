"""Micro- and macro-benchmarks of blocknode; each module runs as ``python -m bench.<name>``.

Every benchmark module exposes ``run(quick: bool) -> list[dict]`` and times with
`bench._stats.measure` (median of several repeats, with their spread).
"""
