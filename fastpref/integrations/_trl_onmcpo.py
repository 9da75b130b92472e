"""OnMC-PO (MC-PO paper, Sec. 3.2 and App. B, "batched online setup") for
:class:`fastpref.integrations.trl.FastPrefDPOTrainer` (a mixin).

For each prompt of a micro-batch the current policy samples ``mcpo_num_generations`` completions, the trainer's
reward model scores them, the best becomes the preferred completion y0 and the others the candidates; MC-PO then
runs on that group exactly as on offline candidate lists (its no-grad pass, the MC-kernel negatives, the forward
with grad on the selected rows). The completions of a prompt are kept for ``mcpo_regenerate_every`` optimizer steps
("sampling from pi_theta is done after a number of gradient updates"): training is cut into segments of that many
steps, and a prompt's group is generated with the policy of the step at which it is first met in a segment.
The paper regenerates the whole dataset with the checkpoint at each segment's start (three segments); generating
lazily, per micro-batch, gives the same data for a prompt first met at a segment's first step and otherwise uses a
policy a few steps newer. Generation is seeded from ``args.seed``, the step, the rank and the micro-batch's first
prompt (reproducible; the global RNG is left untouched). The cache is saved with the trainer's checkpoints.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ._trl_batches import Rows, check_positive_int, left_padded_prompts, pad_rows
from ._trl_spo import generate_seeded

Cached = Tuple[int, List[torch.Tensor]]  # (segment, completions best first)


def check_onmcpo_options(num_generations: int, regenerate_every: int, max_new_tokens: Optional[int]) -> None:
    """Validate the OnMC-PO options (errors name the option)."""
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 2:
        raise ValueError(f"mcpo_num_generations must be an int >= 2 (y0 and at least one candidate), got "
                         f"{num_generations!r}")
    check_positive_int("mcpo_regenerate_every", regenerate_every)
    check_positive_int("mcpo_max_new_tokens", max_new_tokens, optional=True)


def group_rows(prompts: List[torch.Tensor], completions: List[List[torch.Tensor]], pad_id: int) -> Rows:
    """Grouped rows ``[B * G, L]`` (prompt + completion, right-padded; completion tokens scored), group-major."""
    ids, completion = [], []
    for prompt, group in zip(prompts, completions):
        for c in group:
            ids.append(torch.cat([prompt.cpu(), c.cpu()]))
            completion.append(torch.tensor([0] * prompt.numel() + [1] * c.numel(), dtype=torch.long))
    return pad_rows(ids, pad_id), pad_rows([torch.ones_like(t) for t in ids], 0), pad_rows(completion, 0)


class OnlineMCPO:
    """The trainer's OnMC-PO methods; reads ``mcpo_num_generations``, ``mcpo_regenerate_every``,
    ``mcpo_max_new_tokens``, ``fastpref_reward_model`` and ``_onmcpo_cache`` of the trainer."""

    _onmcpo_cache: Dict[Tuple[int, ...], Cached]

    def _onmcpo_setup(self, loss: str, online: bool, num_generations: int, regenerate_every: int,
                      max_new_tokens: Optional[int]) -> None:
        """Check and store the OnMC-PO options (after ``fastpref_reward_model`` is set)."""
        if not isinstance(online, bool):
            raise ValueError(f"mcpo_online must be a bool, got {online!r}")
        check_onmcpo_options(num_generations, regenerate_every, max_new_tokens)
        if online and loss != "mcpo":
            raise ValueError(f"mcpo_online applies to fastpref_loss='mcpo', got fastpref_loss={loss!r}")
        if online and self.fastpref_reward_model is None:
            raise ValueError("mcpo_online=True (OnMC-PO) ranks the policy's own completions: pass reward_model=")
        self.mcpo_online, self.mcpo_num_generations = online, num_generations
        self.mcpo_regenerate_every, self.mcpo_max_new_tokens = regenerate_every, max_new_tokens
        self._onmcpo_cache = {}

    def _mcpo_groups(self, model, inputs: Dict[str, torch.Tensor]) -> Tuple[Rows, int]:
        """MC-PO's groups ``(rows, G)``: the dataset's candidate lists, or OnMC-PO's generated and ranked ones."""
        if not self.mcpo_online:
            rows = (inputs["group_input_ids"], inputs["group_attention_mask"], inputs["group_completion_mask"])
            return rows, int(inputs["group_size"])
        rows = (inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
        return self._onmcpo_groups(model, rows, inputs["input_ids"].shape[0] // 2)

    def _onmcpo_groups(self, model, rows: Rows, num_pairs: int) -> Tuple[Rows, int]:
        """The micro-batch's OnMC-PO groups from the prompts of its first ``num_pairs`` rows: ``(rows, G)``."""
        tok = self._tokenizer
        prompts, left, left_mask = left_padded_prompts(rows, num_pairs, tok.pad_token_id)
        segment = self.state.global_step // self.mcpo_regenerate_every
        keys = [tuple(p.tolist()) for p in prompts]
        stale = [i for i, k in enumerate(keys) if self._onmcpo_cache.get(k, (None,))[0] != segment]
        if stale:
            fresh = self._generate_ranked(model, [prompts[i] for i in stale], left[stale], left_mask[stale],
                                          rows, (segment, keys[stale[0]]))
            for i, group in zip(stale, fresh):
                self._onmcpo_cache[keys[i]] = (segment, group)
        completions = [self._onmcpo_cache[k][1] for k in keys]
        grouped = group_rows(prompts, completions, tok.pad_token_id)
        return tuple(t.to(rows[0].device) for t in grouped), self.mcpo_num_generations

    @torch.no_grad()
    def _generate_ranked(self, model, prompts: List[torch.Tensor], left: torch.Tensor, left_mask: torch.Tensor,
                         rows: Rows, key: Tuple) -> List[List[torch.Tensor]]:
        """``mcpo_num_generations`` sampled completions per prompt, sorted by reward, best first; ``key`` (the
        segment and the first prompt) seeds the generation with the step, so each micro-batch draws its own."""
        tok, g = self._tokenizer, self.mcpo_num_generations
        max_new = self._new_tokens(rows, left.shape[1], self.mcpo_max_new_tokens)  # default: the data's, capped
        seed = self._spo_seed(("onmcpo", self.state.global_step, *key))
        out = generate_seeded(self.accelerator.unwrap_model(model), left, left_mask, tok, num_return_sequences=g,
                              max_new_tokens=max_new, seed=seed)
        new = out[:, left.shape[1]:]
        completions = [_until_eos(row, tok.eos_token_id, tok.pad_token_id) for row in new]
        prompt_ids = [p for p in prompts for _ in range(g)]
        scores = self.fastpref_reward_model.score_token_ids(tok, prompt_ids, completions).view(len(prompts), g)
        order = torch.sort(scores.float().cpu(), dim=1, descending=True, stable=True).indices
        return [[completions[i * g + j] for j in order[i].tolist()] for i in range(len(prompts))]


def _until_eos(row: torch.Tensor, eos_id: Optional[int], pad_id: int) -> torch.Tensor:
    """A generated completion up to and including its first EOS; at least one token (an empty completion would
    have nothing to score)."""
    ids = row.tolist()
    if eos_id is not None and eos_id in ids:
        ids = ids[: ids.index(eos_id) + 1]
    if not ids:
        ids = [eos_id if eos_id is not None else pad_id]
    return torch.tensor(ids, dtype=torch.long)
