"""PKSampler and RandomBatchSampler: batch shape, coverage, determinism, DDP shares, aspect balance."""
from collections import Counter

import pytest

from handclip.data.samplers import PKSampler, RandomBatchSampler
from handclip.errors import UserError

# 12 identities: image counts 1..12 (identity 0 has fewer images than K).
LABELS = [label for label in range(12) for _ in range(label + 1)]


def epoch(sampler, number=0):
    sampler.set_epoch(number)
    return list(sampler)


def assert_p_by_k(batches, labels, p, k):
    for batch in batches:
        counts = Counter(labels[i] for i in batch)
        assert len(batch) == p * k and len(counts) == p and set(counts.values()) == {k}


@pytest.mark.parametrize("drop_last", [True, False])
def test_every_batch_is_p_identities_of_k_images_and_len_is_right(drop_last):
    sampler = PKSampler(LABELS, batch_size=12, k=4, seed=0, drop_last=drop_last)
    batches = epoch(sampler)
    assert_p_by_k(batches, LABELS, p=3, k=4)
    chunks = sum(max(n, 4) // 4 for n in range(1, 13))  # as BoT's RandomIdentitySampler
    assert len(sampler) == len(batches) == (chunks // 3 if drop_last else -(-chunks // 3))


def test_an_identity_with_fewer_than_k_images_is_drawn_with_replacement():
    batches = epoch(PKSampler(LABELS, batch_size=12, k=4, seed=0, drop_last=False))
    assert [i for batch in batches for i in batch if LABELS[i] == 0] == [0, 0, 0, 0]


def test_without_dropping_every_identity_is_seen_and_chunks_do_not_repeat_images():
    labels = [label for label in range(10) for _ in range(8)]  # 2 chunks each, no remainder
    batches = epoch(PKSampler(labels, batch_size=8, k=4, seed=3, drop_last=True))
    seen = [i for batch in batches for i in batch]
    assert sorted(seen) == list(range(len(labels)))  # 20 chunks = 10 batches of 2, each image once


def test_same_seed_and_epoch_repeat_other_epochs_and_seeds_differ():
    first = epoch(PKSampler(LABELS, 12, 4, seed=0), 5)
    assert epoch(PKSampler(LABELS, 12, 4, seed=0), 5) == first
    assert epoch(PKSampler(LABELS, 12, 4, seed=0), 6) != first
    assert epoch(PKSampler(LABELS, 12, 4, seed=1), 5) != first


def test_ddp_ranks_get_equal_disjoint_shares_of_the_single_process_epoch():
    labels = [label for label in range(16) for _ in range(8)]
    single = epoch(PKSampler(labels, 8, 4, seed=2), 1)
    ranks = [PKSampler(labels, 8, 4, seed=2, rank=r, world_size=3) for r in range(3)]
    shares = [epoch(sampler, 1) for sampler in ranks]
    assert len(single) == 16 and [len(s) for s in shares] == [len(r) for r in ranks] == [5, 5, 5]
    for r, share in enumerate(shares):
        assert share == single[r::3][:5]
    images = [i for share in shares for batch in share for i in batch]
    assert len(images) == len(set(images))  # no image on two ranks


def test_every_rank_gets_a_batch_even_when_the_data_is_small():
    shares = [list(PKSampler([0, 0, 1, 1], 4, 2, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert [len(s) for s in shares] == [1, 1]
    assert_p_by_k(shares[0] + shares[1], [0, 0, 1, 1], p=2, k=2)


def test_aspect_balance_takes_each_group_evenly_and_covers_the_largest_group():
    # identity = subject_aspect: 6 identities in aspect a (8 images), 3 in aspect b (4 images).
    labels = [label for label in range(6) for _ in range(8)] + [label for label in range(6, 9) for _ in range(4)]
    groups = ["a"] * 48 + ["b"] * 12
    sampler = PKSampler(labels, batch_size=8, k=4, seed=0, group_of=groups)
    batches = epoch(sampler)
    assert len(sampler) == len(batches) == 12  # a's 12 chunks at 1 per batch; b (3 chunks) recycled
    assert_p_by_k(batches, labels, p=2, k=4)
    for batch in batches:
        assert [groups[i] for i in batch] == ["a"] * 4 + ["b"] * 4
    assert sorted(i for batch in batches for i in batch if groups[i] == "a") == list(range(48))


def test_aspect_balance_with_shared_identities_keeps_chunks_within_a_group():
    # identity = subject across 3 aspects; P = 4 does not split evenly over 3 groups.
    labels = [subject for subject in range(6) for _ in range(3) for _ in range(4)]
    groups = [aspect for _ in range(6) for aspect in "xyz" for _ in range(4)]
    batches = epoch(PKSampler(labels, batch_size=8, k=2, seed=0, group_of=groups))
    assert_p_by_k(batches, labels, p=4, k=2)
    per_group = Counter()
    for batch in batches:
        chunk_groups = [{groups[i] for i in batch[c:c + 2]} for c in range(0, 8, 2)]
        assert all(len(g) == 1 for g in chunk_groups)  # a chunk stays within one aspect
        counts = Counter(g.pop() for g in chunk_groups)
        assert sorted(counts.values()) == [1, 1, 2]  # P // G each, the extra one rotating
        per_group.update(counts)
    assert max(per_group.values()) - min(per_group.values()) <= 1


def test_too_few_identities_for_p_is_a_user_error():
    with pytest.raises(UserError, match="identities"):
        PKSampler([0, 0, 1, 1], batch_size=12, k=4, seed=0)
    with pytest.raises(UserError, match="data.k"):
        PKSampler(LABELS, batch_size=10, k=4, seed=0)


@pytest.mark.parametrize("drop_last, sizes", [(True, [4, 4]), (False, [4, 4, 2])])
def test_random_batches_are_a_permutation_in_batches(drop_last, sizes):
    sampler = RandomBatchSampler(10, batch_size=4, seed=0, drop_last=drop_last)
    batches = epoch(sampler)
    assert [len(b) for b in batches] == sizes and len(sampler) == len(sizes)
    items = [i for b in batches for i in b]
    assert len(set(items)) == len(items) and set(items) <= set(range(10))
    if not drop_last:
        assert sorted(items) == list(range(10))


def test_random_batches_are_deterministic_per_epoch():
    assert epoch(RandomBatchSampler(50, 8, seed=0), 3) == epoch(RandomBatchSampler(50, 8, seed=0), 3)
    assert epoch(RandomBatchSampler(50, 8, seed=0), 3) != epoch(RandomBatchSampler(50, 8, seed=0), 4)


def test_random_batches_split_disjointly_and_evenly_across_ranks():
    ranks = [RandomBatchSampler(50, 8, seed=0, rank=r, world_size=3) for r in range(3)]
    shares = [epoch(sampler, 2) for sampler in ranks]
    assert [len(s) for s in shares] == [len(r) for r in ranks] == [2, 2, 2]
    items = [i for share in shares for batch in share for i in batch]
    assert len(items) == len(set(items)) == 48
