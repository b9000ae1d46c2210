import numpy as np
import pytest
import torch

from handclip.metrics import evaluate_ranking, k_reciprocal_rerank, pairwise_distance


# ---- independent per-query computations ------------------------------------------------------------
def reference_ranking(dist, query_ids, gallery_ids, max_rank=10):
    """One query at a time, in plain Python: the definitions written out."""
    cmc_rows, aps, inps = [], [], []
    for i, query_id in enumerate(query_ids):
        order = sorted(range(len(gallery_ids)), key=lambda j: (dist[i][j], j))
        match_ranks = [rank for rank, j in enumerate(order, start=1) if gallery_ids[j] == query_id]
        if not match_ranks:
            continue
        cmc_rows.append([1.0 if match_ranks[0] <= k else 0.0 for k in range(1, max_rank + 1)])
        aps.append(np.mean([n / rank for n, rank in enumerate(match_ranks, start=1)]))
        inps.append(len(match_ranks) / match_ranks[-1])
    cmc = np.mean(cmc_rows, axis=0)
    return {"cmc": cmc, "mAP": np.mean(aps), "mINP": np.mean(inps), "num_queries": len(aps)}


def reference_trapezoid_map(dist, query_ids, gallery_ids):
    """The published code's AP (compute_mAP of nathanlem1/MBA-Net evaluation_metrics.py), one query
    at a time: the 0-based ranks of the true matches, then the trapezoid sum over them."""
    aps = []
    for i, query_id in enumerate(query_ids):
        order = sorted(range(len(gallery_ids)), key=lambda j: (dist[i][j], j))
        rows_good = [rank for rank, j in enumerate(order) if gallery_ids[j] == query_id]
        if not rows_good:
            continue
        ap = 0.0
        for n, rank in enumerate(rows_good):
            precision = (n + 1) / (rank + 1)
            old_precision = n / rank if rank != 0 else 1.0
            ap += (1 / len(rows_good)) * (old_precision + precision) / 2
        aps.append(ap)
    return np.mean(aps)


def reference_rerank(q_g, q_q, g_g, k1, k2, lambda_value):
    """The k-reciprocal re-ranking of the paper, image by image with Python sets."""
    num_query = len(q_g)
    dist = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float64) ** 2
    dist = dist / dist.max(axis=1, keepdims=True)  # inputs are symmetric: row max = column max
    num = len(dist)
    rank = np.argsort(dist, axis=1, kind="stable")

    def reciprocal(i, k):
        return {j for j in rank[i, :k + 1] if i in rank[j, :k + 1]}

    encoding = np.zeros((num, num))
    for i in range(num):
        neighbours = reciprocal(i, k1)
        expanded = set(neighbours)
        for candidate in neighbours:
            theirs = reciprocal(candidate, int(np.around(k1 / 2)))
            if len(theirs & neighbours) > 2 / 3 * len(theirs):
                expanded |= theirs
        members = sorted(expanded)
        weights = np.exp(-dist[i, members])
        encoding[i, members] = weights / weights.sum()
    if k2 > 1:
        encoding = np.array([encoding[rank[i, :k2]].mean(axis=0) for i in range(num)])
    jaccard = np.zeros_like(q_g, dtype=np.float64)
    for i in range(num_query):
        for j in range(q_g.shape[1]):
            a, b = encoding[i], encoding[num_query + j]
            jaccard[i, j] = 1 - np.minimum(a, b).sum() / np.maximum(a, b).sum()
    return (1 - lambda_value) * jaccard + lambda_value * dist[:num_query, num_query:]


def random_case(rng, num_query, num_gallery, num_ids, unmatched=0):
    dist = rng.random((num_query, num_gallery))
    gallery_ids = rng.integers(0, num_ids, num_gallery)
    query_ids = rng.choice(np.unique(gallery_ids), num_query)
    query_ids[:unmatched] = num_ids + np.arange(unmatched)  # identities no gallery image has
    return dist, query_ids, gallery_ids


def assert_same_metrics(got, expected):
    np.testing.assert_allclose(got["cmc"], expected["cmc"])
    assert got["rank1"] == pytest.approx(expected["cmc"][0])
    assert got["rank5"] == pytest.approx(expected["cmc"][4])
    assert got["rank10"] == pytest.approx(expected["cmc"][9])
    assert got["mAP"] == pytest.approx(expected["mAP"])
    assert got["mINP"] == pytest.approx(expected["mINP"])
    assert got["num_queries"] == expected["num_queries"]


# ---- evaluate_ranking ---------------------------------------------------------------------------------
@pytest.mark.parametrize("num_query, num_gallery, num_ids, unmatched", [
    (50, 20, 20, 0),    # most identities one gallery image
    (60, 40, 8, 0),     # several gallery images per identity
    (40, 30, 12, 7),    # queries whose identity is not in the gallery
    (25, 6, 4, 3),      # gallery smaller than 10
])
def test_evaluate_ranking_matches_reference(num_query, num_gallery, num_ids, unmatched):
    rng = np.random.default_rng(num_query * 1000 + num_gallery)
    dist, query_ids, gallery_ids = random_case(rng, num_query, num_gallery, num_ids, unmatched)
    got = evaluate_ranking(dist, query_ids, gallery_ids)
    assert_same_metrics(got, reference_ranking(dist, query_ids, gallery_ids))
    assert got["mAP_trapezoid"] == pytest.approx(reference_trapezoid_map(dist, query_ids, gallery_ids))
    assert got["num_queries"] == num_query - unmatched


def test_small_gallery_counts_every_query_at_ranks_past_its_size():
    rng = np.random.default_rng(1)
    dist, query_ids, gallery_ids = random_case(rng, 30, 4, 3, unmatched=5)
    result = evaluate_ranking(dist, query_ids, gallery_ids)
    assert result["rank5"] == result["rank10"] == 1.0
    np.testing.assert_array_equal(result["cmc"][3:], 1.0)
    assert len(result["cmc"]) == 10


def test_hand_computed_values_and_string_ids():
    # Gallery order by distance: B, A, C, A → true matches of query A at ranks 2 and 4.
    dist = [[0.3, 0.1, 0.5, 0.9], [0.2, 0.4, 0.6, 0.8]]
    result = evaluate_ranking(dist, ["0000001|dorsal_r", "0000002|dorsal_r"],
                              ["0000001|dorsal_r", "0000002|dorsal_r", "0000003|dorsal_r", "0000001|dorsal_r"])
    # Query 0: AP = (1/2 + 2/4) / 2 = 0.5, INP = 2/4; query 1 (B, one image at rank 2): AP 0.5, INP 0.5.
    assert result["rank1"] == 0.0
    assert result["rank5"] == 1.0
    np.testing.assert_allclose(result["cmc"][:3], [0.0, 1.0, 1.0])
    assert result["mAP"] == pytest.approx(0.5)
    assert result["mINP"] == pytest.approx(0.5)
    assert result["num_queries"] == 2


@pytest.mark.parametrize("rank", [0, 1, 4])
def test_trapezoid_ap_of_one_true_match(rank):
    # one query, gallery of 6 ordered by distance; its one true image sits at 0-based `rank`
    gallery_ids = ["x"] * 6
    gallery_ids[rank] = "q"
    result = evaluate_ranking([np.arange(6.0)], ["q"], gallery_ids)
    assert result["mAP_trapezoid"] == pytest.approx(1.0 if rank == 0 else 1 / (2 * (rank + 1)))
    assert result["mAP"] == pytest.approx(1 / (rank + 1))


def test_trapezoid_ap_of_several_true_matches():
    # true images at 0-based ranks 0, 2, 3: p = 1, 2/3, 3/4; p_old = 1, 1/2, 2/3
    result = evaluate_ranking([np.arange(5.0)], ["q"], ["q", "x", "q", "q", "y"])
    expected = ((1 + 1) / 2 + (1 / 2 + 2 / 3) / 2 + (2 / 3 + 3 / 4) / 2) / 3
    assert result["mAP_trapezoid"] == pytest.approx(expected)
    assert result["mAP"] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    # a second query whose only match is at 0-based rank 1 (1/4), and one unmatched query (left out)
    both = evaluate_ranking([np.arange(5.0)] * 3, ["q", "x", "z"], ["q", "x", "q", "q", "y"])
    assert both["mAP_trapezoid"] == pytest.approx((expected + 1 / 4) / 2)
    assert both["num_queries"] == 2


def test_ties_keep_gallery_order():
    rng = np.random.default_rng(5)
    dist, query_ids, gallery_ids = random_case(rng, 30, 200, 50)
    tied = np.floor(dist * 4)  # four distinct distances: ties everywhere
    got = evaluate_ranking(tied, query_ids, gallery_ids)
    assert_same_metrics(got, reference_ranking(tied, query_ids, gallery_ids))
    assert got["mAP_trapezoid"] == pytest.approx(reference_trapezoid_map(tied, query_ids, gallery_ids))
    assert evaluate_ranking(np.zeros((1, 2)), ["a"], ["b", "a"])["rank1"] == 0.0


def test_every_query_unmatched_raises_value_error():
    with pytest.raises(ValueError, match="no query"):
        evaluate_ranking(np.zeros((2, 3)), [7, 8], [1, 2, 3])


def test_shape_mismatch_raises_value_error():
    with pytest.raises(ValueError, match="shape"):
        evaluate_ranking(np.zeros((2, 3)), [1, 2], [1, 2])


def test_ints_and_numpy_ints_are_the_same_identity():
    assert evaluate_ranking(np.zeros((1, 2)), [np.int64(5)], [4, 5])["mAP"] == pytest.approx(0.5)


# ---- pairwise_distance ---------------------------------------------------------------------------------
def test_pairwise_distance_cosine_and_euclidean():
    rng = np.random.default_rng(2)
    query, gallery = rng.normal(size=(5, 8)), rng.normal(size=(7, 8))
    unit_q = query / np.linalg.norm(query, axis=1, keepdims=True)
    unit_g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    cosine = pairwise_distance(query, gallery, "cosine")
    assert isinstance(cosine, np.ndarray) and cosine.shape == (5, 7)
    np.testing.assert_allclose(cosine, 1 - unit_q @ unit_g.T, atol=1e-5)
    euclidean = pairwise_distance(torch.from_numpy(query), torch.from_numpy(gallery), "euclidean")
    np.testing.assert_allclose(euclidean, np.linalg.norm(query[:, None] - gallery[None], axis=2), atol=1e-4)


def test_pairwise_distance_rejects_unknown_metric():
    with pytest.raises(ValueError, match="manhattan"):
        pairwise_distance(np.ones((1, 2)), np.ones((1, 2)), "manhattan")


# ---- k_reciprocal_rerank -------------------------------------------------------------------------------
def features_case(seed, num_query=30, num_gallery=25, dim=6):
    rng = np.random.default_rng(seed)
    query, gallery = rng.normal(size=(num_query, dim)), rng.normal(size=(num_gallery, dim))
    return (pairwise_distance(query, gallery, "euclidean"), pairwise_distance(query, query, "euclidean"),
            pairwise_distance(gallery, gallery, "euclidean"))


@pytest.mark.parametrize("k1, k2, num_query, num_gallery", [
    (20, 6, 30, 25), (5, 1, 30, 25), (7, 3, 30, 25),
    (20, 6, 8, 5),  # fewer images than k1: every image is a neighbour
])
def test_rerank_matches_reference(k1, k2, num_query, num_gallery):
    q_g, q_q, g_g = features_case(seed=k1, num_query=num_query, num_gallery=num_gallery)
    got = k_reciprocal_rerank(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=0.3)
    assert got.shape == q_g.shape
    np.testing.assert_allclose(got, reference_rerank(q_g, q_q, g_g, k1, k2, 0.3), atol=1e-5)


def test_rerank_lambda_one_is_the_rescaled_original():
    q_g, q_q, g_g = features_case(seed=3)
    got = k_reciprocal_rerank(q_g, q_q, g_g, lambda_value=1.0)
    row_max = np.maximum(q_q.max(axis=1), q_g.max(axis=1)) ** 2
    np.testing.assert_allclose(got, q_g ** 2 / row_max[:, None], rtol=1e-5)
    np.testing.assert_array_equal(np.argsort(got, axis=1), np.argsort(q_g, axis=1))


def test_rerank_fixes_a_query_that_its_neighbours_place_right():
    # The first query is nearer a "B" gallery image than to its own "A" one, but the other A
    # queries around the origin are its k-reciprocal neighbours and sit on the A gallery image.
    queries = np.array([[0.3, 0], [0, .05], [.05, 0], [-.05, 0], [0, -.05],
                        [0.3, 0.6], [0.35, 0.6], [0.25, 0.6], [0.3, 0.65]])
    gallery = np.array([[0.3, 0.28], [0.0, 0.0], [0.3, 0.55]])
    query_ids, gallery_ids = ["A"] * 5 + ["B"] * 4, ["B", "A", "B"]
    q_g = pairwise_distance(queries, gallery, "euclidean")
    reranked = k_reciprocal_rerank(q_g, pairwise_distance(queries, queries, "euclidean"),
                                   pairwise_distance(gallery, gallery, "euclidean"), k1=6, k2=2)
    assert np.argmin(q_g[0]) == 0 and np.argmin(reranked[0]) == 1
    before = evaluate_ranking(q_g, query_ids, gallery_ids)
    after = evaluate_ranking(reranked, query_ids, gallery_ids)
    assert before["rank1"] == pytest.approx(8 / 9) and after["rank1"] == 1.0


def test_rerank_at_lambda_one_keeps_the_ranking_and_by_default_helps_clustered_features():
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(6, 8))
    query_ids, gallery_ids = rng.integers(0, 6, 40), np.repeat(np.arange(6), 3)
    query = centres[query_ids] + 0.8 * rng.normal(size=(40, 8))
    gallery = centres[gallery_ids] + 0.8 * rng.normal(size=(18, 8))
    distances = (pairwise_distance(query, gallery), pairwise_distance(query, query), pairwise_distance(gallery, gallery))
    plain = evaluate_ranking(distances[0], query_ids, gallery_ids)
    # lambda 1: only the original distance, rescaled per query, so each query's order is unchanged
    unchanged = evaluate_ranking(k_reciprocal_rerank(*distances, lambda_value=1.0), query_ids, gallery_ids)
    for key in ("rank1", "rank5", "rank10", "mAP", "mAP_trapezoid", "mINP"):
        assert unchanged[key] == pytest.approx(plain[key]), key
    reranked = evaluate_ranking(k_reciprocal_rerank(*distances), query_ids, gallery_ids)
    assert reranked["mAP"] > plain["mAP"]


# ---- the same metrics on the device ---------------------------------------------------------------
@pytest.mark.parametrize("queries, gallery, identities, tie_levels", [
    (200, 60, 30, None),  # some queries unmatched, some identities several times in the gallery
    (50, 7, 5, 3),  # a gallery smaller than rank 10, and many tied distances (stable order)
    (300, 120, 40, 10),
])
def test_ranking_metrics_on_the_device_equal_the_numpy_ones(queries, gallery, identities, tie_levels):
    from handclip.metrics import distance_matrix, ranking_metrics

    rng = np.random.default_rng(queries)
    query_ids = [f"{i:07d}|dorsal_r" for i in rng.integers(0, identities, queries)]
    gallery_ids = [f"{i:07d}|dorsal_r" for i in rng.integers(0, identities, gallery)]
    query_ids[0] = "unmatched"
    dist = distance_matrix(torch.randn(queries, 16), torch.randn(gallery, 16))
    if tie_levels:
        dist = (dist * tie_levels).round() / tie_levels
    expected = evaluate_ranking(dist.numpy(), query_ids, gallery_ids)
    result = ranking_metrics(dist, query_ids, gallery_ids)
    assert result.keys() == expected.keys() and result["num_queries"] == expected["num_queries"] < queries
    np.testing.assert_allclose(result["cmc"], expected["cmc"], rtol=0, atol=1e-12)
    for key in ("rank1", "rank5", "rank10", "mAP", "mAP_trapezoid", "mINP"):
        assert result[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key
    with pytest.raises(ValueError, match="no query"):
        ranking_metrics(dist[:1], ["unmatched"], gallery_ids)
