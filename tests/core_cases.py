"""The core-op case list of the torch-backend parity tests.

``CASES`` maps a case name to :func:`fastpref.testing.make_core_case` options; :func:`named_case` builds
one by name. The builder, the runner (``run_core``) and the error metric (``rel_err``) are in
:mod:`fastpref.testing`.
"""
from __future__ import annotations

import torch

from fastpref.testing import CoreCase, make_core_case

CASES = {
    "padded": dict(),                                                  # padded rows, some ignored positions
    "packed": dict(layout="packed", bias=True, ref="separate", kl="forward"),  # unequal sequences, interleaved
    "bias": dict(bias=True),                                           # LM-head bias
    "temp_softcap": dict(bias=True, temperature=0.6, softcap=4.0),     # temperature + softcap
    "kl_forward": dict(bias=True, ref="separate", kl="forward"),       # separate reference head (+ bias), forward KL
    "kl_reverse": dict(ref="separate", kl="reverse"),                  # separate reference head, reverse KL
    "shared_ref_head": dict(ref="shared"),                             # reference from ref_hidden, policy head
    "kl_temp_softcap": dict(bias=True, ref="shared", kl="forward", temperature=0.6, softcap=4.0),
    "kl_reverse_shared": dict(bias=True, ref="shared", kl="reverse"),  # reverse KL through the shared head + bias
    "fully_ignored": dict(ignore_seq=1, ref="separate", kl="forward"),  # a sequence whose positions are all ignored
    "one_token": dict(layout="packed", lengths=(1, 1, 1), ignore=0.0, ref="separate", kl="forward"),
    "vocab_4099": dict(V=4099),                                        # V not a multiple of the vocab block
    "n_equals_1": dict(layout="packed", lengths=(1,), ignore=0.0),     # a single position
}


def named_case(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> CoreCase:
    """The case ``name`` of :data:`CASES`."""
    return make_core_case(dtype, seed, **CASES[name])
