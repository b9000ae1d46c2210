"""Batch samplers: identity-balanced P×K batches, and plain shuffling; both DDP-aware.

Both yield one list of dataset indices per batch and are deterministic given (seed, epoch):
call ``set_epoch(e)`` before each epoch. ``batch_size`` is per process. With ``world_size`` > 1
every rank gets a disjoint share of the epoch's batches and the same number of them, which
DistributedDataParallel needs (a rank with one batch more would wait forever in all-reduce).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import BatchSampler, DistributedSampler

from handclip.errors import UserError

Chunk = tuple[int, list[int]]  # (label, K indices of that label)


class RandomBatchSampler(BatchSampler):
    """Plain shuffling (for ID-only training): torch's DistributedSampler cut into batches.

    ``drop_last``: drop the incomplete last batch (and the few items that do not split evenly
    across ranks); otherwise keep it, and pad the ranks to equal length by repeating items.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True):
        shuffler = DistributedSampler(range(num_items), num_replicas=world_size, rank=rank, shuffle=True,
                                      seed=seed, drop_last=drop_last)
        super().__init__(shuffler, batch_size, drop_last)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


class PKSampler:
    """Batches of P = batch_size // k identities × K images each (needed by triplet and SupCon).

    As BoT's RandomIdentitySampler: each identity's images are shuffled and cut into chunks of K
    (an identity with fewer than K images gives one chunk drawn with replacement; a remainder
    smaller than K is left out), and batches take P chunks of P different identities until the
    chunks run out — about (number of images) / batch_size batches, every identity in each epoch.
    ``drop_last=False`` makes one more batch instead, completed with chunks of a second pass.

    ``group_of`` (e.g. each image's aspect) balances the groups: a batch takes P / G chunks from
    each of the G groups (the remainder of P / G rotates over the groups from batch to batch). A
    chunk then holds the images of one identity *within one group*, and the epoch lasts until
    the largest group's chunks are used; smaller groups start further passes over theirs.

    With ``world_size`` > 1 every rank builds the same epoch and takes every world_size-th batch
    from its rank on. There is always at least one batch per rank.
    """

    def __init__(self, labels: Sequence[int], batch_size: int, k: int, seed: int, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True, group_of: Sequence[str] | None = None):
        if k < 1 or batch_size < k or batch_size % k:
            raise UserError(f"data.k: {k} must be >= 1 and divide data.batch_size ({batch_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if group_of is not None and len(group_of) != len(labels):
            raise ValueError(f"group_of has {len(group_of)} entries for {len(labels)} labels")
        self.p, self.k, self.seed = batch_size // k, k, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._units = _indices_by_group_and_label(labels, group_of)
        self._groups = sorted(self._units)
        self._labels_of = {group: set(units) for group, units in self._units.items()}
        identities = set().union(*self._labels_of.values())
        if len(identities) < self.p:
            raise UserError(f"data.batch_size / data.k: a P×K batch needs {self.p} identities, "
                            f"the training set has {len(identities)}")
        self._batches_per_rank = self._count_batches(drop_last)

    def _count_batches(self, drop_last: bool) -> int:
        # Batches needed to use every chunk of the largest group at P / G chunks per batch.
        largest = max(sum(max(len(ix), self.k) // self.k for ix in units.values()) for units in self._units.values())
        numerator, denominator = largest * len(self._groups), self.p * self.world_size
        per_rank = numerator // denominator if drop_last else -(-numerator // denominator)
        return max(per_rank, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._batches_per_rank

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        queues: dict[str, list[Chunk]] = {group: [] for group in self._groups}
        for b in range(self._batches_per_rank * self.world_size):
            batch, used = [], set()
            for group in self._slot_groups(b):
                label, indices = self._take_chunk(group, queues, used, rng)
                used.add(label)
                batch.extend(indices)
            if b % self.world_size == self.rank:
                yield batch

    def _slot_groups(self, batch_number: int) -> list[str]:
        """The group of each of the P chunks of a batch: P // G each, the remainder rotating."""
        count = len(self._groups)
        base, extra = divmod(self.p, count)
        first = batch_number * extra % count
        return [group for i, group in enumerate(self._groups) for _ in range(base + ((i - first) % count < extra))]

    def _take_chunk(self, group: str, queues: dict[str, list[Chunk]], used: set[int],
                    rng: np.random.Generator) -> Chunk:
        """The next chunk of ``group`` whose identity is not yet in the batch."""
        if not self._labels_of[group] - used:  # every identity of this group is in the batch already
            group = next(other for other in self._groups if self._labels_of[other] - used)
        queue = queues[group]
        while True:
            for position, (label, _) in enumerate(queue):
                if label not in used:
                    return queue.pop(position)
            queue.extend(self._shuffled_chunks(group, rng))

    def _shuffled_chunks(self, group: str, rng: np.random.Generator) -> list[Chunk]:
        """One pass over the group's images, as K-chunks in random order."""
        chunks = []
        for label, indices in self._units[group].items():
            if len(indices) < self.k:
                picked = rng.choice(indices, self.k, replace=True)
            else:
                picked = rng.permutation(indices)
            chunks.extend((label, picked[i:i + self.k].tolist()) for i in range(0, len(picked) - self.k + 1, self.k))
        return [chunks[i] for i in rng.permutation(len(chunks))]


def _indices_by_group_and_label(labels: Sequence[int], group_of: Sequence[str] | None) -> dict[str, dict[int, np.ndarray]]:
    collected: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for index, label in enumerate(labels):
        collected["" if group_of is None else group_of[index]][int(label)].append(index)
    return {group: {label: np.array(ix) for label, ix in sorted(units.items())} for group, units in collected.items()}
