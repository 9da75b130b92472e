"""Batch statistics over ranks: the collectives behind the statistics that the papers compute on the
global batch (alpha-DPO's margin statistics, KTO's z0, SPO's weight baseline; docs/losses.md §7).

Every function is the identity when torch.distributed is not initialized.
"""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


def is_distributed() -> bool:
    """Whether torch.distributed is available and initialized."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _stats_contributes(replica_group: Optional[object]) -> bool:
    """Whether this rank's values enter a statistic deduplicated over ``replica_group`` (its rank 0 only)."""
    return replica_group is None or torch.distributed.get_rank(replica_group) == 0


def gather_across_ranks(values: Tensor, *, group: Optional[object] = None,
                        replica_group: Optional[object] = None) -> Tensor:
    """Concatenate a 1-D tensor over the ranks of ``group`` (default: the world); sizes may differ per rank.

    Used for the batch statistics that the papers compute on the global batch (alpha-DPO's margin
    statistics, KTO's z0). The result is detached and identical on every rank of ``group``; identity
    when torch.distributed is not initialized.

    ``replica_group``: ranks that hold the *same* batch (a vocabulary-parallel group: every rank of it
    makes the same call on the same sequences). Only its rank 0 contributes, so each distinct batch is
    counted once; without it a vocabulary-parallel group of size n would enter every value n times
    (same mean, a smaller unbiased std). Every rank of ``group`` must call (a collective).
    """
    values = values.detach().reshape(-1)
    if not is_distributed():
        return values
    dist = torch.distributed
    world = dist.get_world_size(group)
    if not _stats_contributes(replica_group):
        values = values[:0]
    if world == 1:
        return values
    size = torch.tensor([values.numel()], dtype=torch.long, device=values.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s.item()) for s in sizes]
    if max(counts) == 0:
        return values
    # all_gather needs equal shapes: pad to the largest rank, then trim.
    padded = values.new_zeros(max(counts))
    padded[: values.numel()] = values
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def global_mean(local_mean: Tensor, count: int, *, group: Optional[object] = None,
                replica_group: Optional[object] = None) -> Tensor:
    """Mean over the ranks of ``group`` (default: the world) of per-rank means of ``count`` items each.

    Identity when torch.distributed is not initialized. ``replica_group``: as in
    :func:`gather_across_ranks`, ranks holding the same batch, counted once (its rank 0 contributes).
    """
    local_mean = local_mean.detach()
    if not is_distributed() or torch.distributed.get_world_size(group) == 1:
        return local_mean
    weight = float(count) if _stats_contributes(replica_group) else 0.0
    flat = local_mean.reshape(-1).double()
    total = torch.cat([flat * weight if weight else torch.zeros_like(flat),
                       torch.tensor([weight], dtype=torch.float64, device=local_mean.device)])
    torch.distributed.all_reduce(total, group=group)
    return (total[:-1] / total[-1]).to(local_mean.dtype).reshape(local_mean.shape)


def check_stats_group(stats_group: Optional[object]) -> Optional[object]:
    """``stats_group`` as given when it is None, ``"local"`` or a torch.distributed process group."""
    if stats_group is None or stats_group == "local":
        return stats_group
    if isinstance(stats_group, str):
        raise ValueError(f"stats_group must be None, 'local' or a torch.distributed process group, got {stats_group!r}")
    process_group = getattr(torch.distributed, "ProcessGroup", None) if torch.distributed.is_available() else None
    if process_group is None or not isinstance(stats_group, process_group):
        raise TypeError("stats_group must be None, 'local' or a torch.distributed process group, got "
                        f"{type(stats_group).__name__}")
    return stats_group


def broadcast_from_first(values: Tensor, group: Optional[object]) -> Tensor:
    """``values`` of rank 0 of ``group``, on every rank of it (identity without a group of two or more)."""
    if group is None or not is_distributed() or torch.distributed.get_world_size(group) == 1:
        return values
    values = values.contiguous()
    torch.distributed.broadcast(values, src=torch.distributed.get_global_rank(group, 0), group=group)
    return values
