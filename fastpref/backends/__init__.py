"""Backends of ``fused_logprobs``: launchers behind the op's one autograd Function (``fastpref/ops.py``).

- ``torch_backend``: tiles in plain PyTorch (CPU, and a fallback on any device; float64 too).
- ``triton_backend``: the Triton kernels of the repository's ``csrc_triton/`` folder, installed as
  ``fastpref.kernels`` (CUDA, or Triton's interpreter); imported lazily, Triton is optional on CPU.

The contract every backend keeps (no autograd inside a backend; backends never import ``fastpref.ops``):

``forward(prep: Prepared) -> ForwardOutputs``
    Per-position ``[N]`` vectors in the compute dtype (fp64 for fp64 inputs, else fp32), 0 at ignored
    positions: ``token_logps`` and the log-sum-exp ``lse``, plus ``ref_token_logps``/``ref_lse`` with a
    reference and ``token_kl`` with ``prep.kl``. Per-sequence sums (``seq_logps`` ...) are optional. For each
    name in ``prep.extra_outputs`` (of ``fastpref._types.EXTRA_OUTPUTS``) the field of that name, ``[N]``, of the
    policy's softmax over the whole vocabulary (``prep.total_vocab``; combined across the ranks of a
    vocabulary-parallel group): ``entropy`` H, ``mean_logits``, ``is_top1`` (1.0 where the target's logit
    equals the maximum, else 0.0) and ``log_sum_sq_probs``; the others stay None. The outputs must not
    alias one another.

``backward(prep, lse, ref_lse, token_kl, grad_logps, grad_kl, need, *, entropy=None, grad_entropy=None)
-> (dH, dW, db)``
    Gradients with respect to ``prep.hidden`` ``[N, D]``, ``prep.weight`` ``[V, D]`` and ``prep.bias``
    ``[V]`` in the compute dtype (or already in the input's dtype, when one GEMM rounded it once, as eager
    autograd does), None where ``need = (hidden, weight, bias)`` is False, from the upstream
    per-position gradients of ``token_logps`` (``grad_logps``, ``[N]``) and of ``token_kl`` (``grad_kl``,
    ``[N]`` or None), and of the entropy extra (``grad_entropy``, ``[N]``, with the forward's saved
    ``entropy``; both None when the entropy was not requested or has no gradient), which adds
    ``-grad_entropy * p_j (log p_j + H)`` to the logits gradient. The per-sequence gradients were already
    folded into them by the Function.

A backend may also define ``check_supported(prep)``, raising for inputs it does not take.

The Triton backend never synchronizes with the host (no ``.item()``, ``nonzero()`` or Python branch on a
tensor's value), since on a GPU it runs between a model's forward and its optimizer step; the torch
backend, the CPU path where a sync costs nothing, compacts rows with ``nonzero()``.
"""
