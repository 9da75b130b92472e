"""fastpref's benchmark suite: ``fastpref bench`` (see bench/runner.py) and pytest-benchmark entries.

Modules: ``workloads`` (inputs and one fwd+bwd callable per implementation), ``peers`` (eager
TRL-style, Liger-Kernel, Cut Cross-Entropy), ``measure`` (interleaved timing, memray / CUDA peak
memory), ``report`` (rich table, results.json, results.md, PNG plots), ``runner`` (the grid).
"""
