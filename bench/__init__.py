"""fastpref's benchmark suite: ``fastpref bench`` (see bench/runner.py) and pytest-benchmark entries.

Modules: ``workloads`` (inputs and one fwd+bwd callable per implementation), ``peers`` (eager full logits,
TRL's chunked LM head, Liger-Kernel, Cut Cross-Entropy), ``measure`` (interleaved timing, memray / CUDA
peak memory), ``report`` (rich table, results.json, results.md, PNG plots), ``runner`` (the grid),
``readme`` (README.md's generated Performance blocks) and ``refresh`` (rerun and regenerate in one command).
"""
