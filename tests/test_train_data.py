"""train/data.py's micro-batch order: seeded, resumable at any micro-batch, and (train.group_by_length) grouped by
length without losing or repeating rows within an epoch."""

from __future__ import annotations

import torch

from specdistill.train.data import batches_per_epoch, micro_batch_indices


def padded_fraction(batches: list[list[int]], lengths: torch.Tensor) -> float:
    """The share of computed positions that are padding (a micro-batch is as long as its longest row)."""
    computed = sum(int(lengths[batch].max()) * len(batch) for batch in batches)
    return 1 - sum(int(lengths[batch].sum()) for batch in batches) / computed


def test_grouped_batches_pad_less_and_keep_every_row_once_per_epoch():
    lengths = torch.randint(20, 600, (1000,), generator=torch.Generator().manual_seed(0))
    per_epoch = batches_per_epoch(1000, 8)
    plain = micro_batch_indices(1000, 8, seed=3, start=0)
    grouped = micro_batch_indices(1000, 8, seed=3, start=0, lengths=lengths)
    plain_epoch = [next(plain) for _ in range(per_epoch)]
    grouped_epoch = [next(grouped) for _ in range(per_epoch)]
    rows = [row for batch in grouped_epoch for row in batch]
    assert len(rows) == len(set(rows)) == per_epoch * 8  # no row twice, none lost beyond the last partial batch
    assert padded_fraction(grouped_epoch, lengths) < 0.05 < 0.25 < padded_fraction(plain_epoch, lengths)
    # the micro-batches are shuffled after grouping: lengths do not fall monotonically through the epoch
    longest = [int(lengths[batch].max()) for batch in grouped_epoch]
    assert longest != sorted(longest, reverse=True) and longest != sorted(longest)
    # the next epoch is another order
    assert next(grouped) != grouped_epoch[0]


def test_grouped_order_depends_only_on_seed_and_micro_batch_number():
    lengths = torch.randint(20, 600, (300,), generator=torch.Generator().manual_seed(1))
    run = micro_batch_indices(300, 4, seed=7, start=0, lengths=lengths)
    first = [next(run) for _ in range(200)]  # more than two epochs
    resumed = micro_batch_indices(300, 4, seed=7, start=120, lengths=lengths)
    assert [next(resumed) for _ in range(80)] == first[120:]
    other_seed = micro_batch_indices(300, 4, seed=8, start=0, lengths=lengths)
    assert [next(other_seed) for _ in range(10)] != first[:10]
