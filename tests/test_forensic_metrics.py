"""Forensic numbers against independent computations: verification metrics, Cllr / Cllr_min /
Cllr_cal, ECE, ELUB, the calibrators, subject-disjoint folds and the verbal scale. No models."""
import json
import math

import numpy as np
import pytest
import torch

import handclip
from handclip.errors import UserError
from handclip.forensic import calibration
from handclip.forensic.calibration import (
    METHODS, cross_validated_llr, elub_bounds, fit_calibrator, load_calibrator, subject_folds)
from handclip.forensic.validation import cllr, cllr_min, empirical_cross_entropy, pav_llr, validation_summary
from handclip.forensic.verbal import verbal_equivalent
from handclip.forensic.verification import (
    pair_labels, pair_labels_on_device, summarise_verification, verification_metrics, verification_metrics_on_device)


def gaussian_scores(n_same=300, n_different=1200, gap=1.5, seed=0):
    rng = np.random.default_rng(seed)
    scores = np.r_[rng.normal(gap, 1.0, n_same), rng.normal(0.0, 1.0, n_different)]
    return scores, np.r_[np.ones(n_same, bool), np.zeros(n_different, bool)]


# ---- independent reference implementations (plain loops, the papers' definitions) -------------------
def reference_cllr(llrs, same):
    lrs = [10.0 ** v for v in llrs]
    hp = [math.log2(1 + 1 / lr) for lr, s in zip(lrs, same) if s]
    hd = [math.log2(1 + lr) for lr, s in zip(lrs, same) if not s]
    return 0.5 * (sum(hp) / len(hp) + sum(hd) / len(hd))


def reference_pav_posterior(values, labels):
    """Pool adjacent violators on (value, label) sorted by value; equal values start as one pool."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    pools = []  # [sum of labels, count, members]
    for i in order:
        if pools and values[pools[-1][2][-1]] == values[i]:
            pools[-1][0] += labels[i]; pools[-1][1] += 1; pools[-1][2].append(i)
        else:
            pools.append([labels[i], 1, [i]])
        while len(pools) > 1 and pools[-2][0] / pools[-2][1] > pools[-1][0] / pools[-1][1]:
            total, count, members = pools.pop()
            pools[-1][0] += total; pools[-1][1] += count; pools[-1][2] += members
    posterior = [0.0] * len(values)
    for total, count, members in pools:
        for i in members:
            posterior[i] = total / count
    return posterior


def reference_rates(scores, same):
    """(FMR, FNMR) at every threshold t (accept when score >= t), t over the scores and +inf."""
    thresholds = sorted(set(scores)) + [math.inf]
    n_same, n_diff = sum(same), len(same) - sum(same)
    points = []
    for t in thresholds:
        fm = sum(1 for s, y in zip(scores, same) if s >= t and not y) / n_diff
        fnm = sum(1 for s, y in zip(scores, same) if s < t and y) / n_same
        points.append((fm, fnm))
    return sorted(points, key=lambda p: (p[0], -p[1]))


def reference_elub(llrs, same, step=0.01):
    ss = [v for v, s in zip(llrs, same) if s]
    ds = [v for v, s in zip(llrs, same) if not s]
    low = max(min(llrs), -math.log10(len(ss) + 1))
    high = min(max(llrs), math.log10(len(ds) + 1))
    k_low, k_high = min(0, math.floor(low / step)), max(0, math.floor(high / step) + 1)
    grid = [k * step for k in range(k_low, k_high + 1)]
    worse_left, worse_right = [], []
    for t in grid:
        misses = sum(1 for v in ss if v <= t) + 1
        accepts = sum(1 for v in ds if v > t) + 1
        error = misses / (len(ss) + 1) + 10 ** t * accepts / (len(ds) + 1)
        if error > min(1.0, 10 ** t):
            if t <= 0:
                worse_left.append(t)
            if t >= 0:
                worse_right.append(t)
    lower = max(worse_left) + step if worse_left else grid[0]
    upper = min(worse_right) - step if worse_right else grid[-1]
    return min(lower, 0.0), max(upper, 0.0)


# ---- verification --------------------------------------------------------------------------------------
def test_verification_metrics_match_a_threshold_sweep():
    scores, same = gaussian_scores(n_same=60, n_different=400, gap=1.2, seed=3)
    scores = np.round(scores, 1)  # ties
    metrics = verification_metrics(scores, same)
    points = reference_rates(list(scores), list(same))
    # EER: the FMR = FNMR crossing, interpolated between the operating points either side
    for (fm0, fnm0), (fm1, fnm1) in zip(points, points[1:]):
        if fnm0 - fm0 > 0 >= fnm1 - fm1:
            w = (fnm0 - fm0) / ((fnm0 - fm0) - (fnm1 - fm1))
            expected_eer = fm0 + w * (fm1 - fm0)
            break
    assert metrics["eer"] == pytest.approx(expected_eer)
    for key, target in (("fnmr_at_fmr_1e-2", 1e-2), ("fnmr_at_fmr_1e-3", 1e-3)):
        assert metrics[key] == pytest.approx(min(fnm for fm, fnm in points if fm <= target))
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a in scores[same] for b in scores[~same]]
    assert metrics["auc"] == pytest.approx(sum(wins) / len(wins))


@pytest.mark.parametrize("seed", range(6))
def test_verification_on_the_device_equals_scikit_learns(seed):
    rng = np.random.default_rng(seed)
    scores, same = gaussian_scores(n_same=int(rng.integers(1, 80)), n_different=int(rng.integers(1, 900)),
                                   gap=float(rng.uniform(0, 3)), seed=seed)
    if seed % 2:
        scores = np.round(scores, 1)  # runs of tied scores
    expected = verification_metrics(scores, same)
    got = verification_metrics_on_device(torch.from_numpy(scores), torch.from_numpy(same))
    assert got.keys() == expected.keys()
    assert all(got[key] == pytest.approx(expected[key], abs=1e-12) for key in expected), (got, expected)


def test_pair_labels_on_the_device_equal_the_host_ones():
    query, gallery = ["0001", "0002", 7, "0001"], ["0002", "0001", "7", 7, "0003"]  # "7" is not 7
    expected = pair_labels(query, gallery)
    assert np.array_equal(pair_labels_on_device(query, gallery, torch.device("cpu")).numpy(), expected)
    assert expected.sum() == 4


def test_verification_on_the_device_of_separated_and_one_class_scores():
    perfect = verification_metrics_on_device(torch.tensor([[0.9, 0.8], [0.1, 0.2]]), torch.tensor([[1, 1], [0, 0]]).bool())
    assert perfect == {"eer": 0.0, "fnmr_at_fmr_1e-2": 0.0, "fnmr_at_fmr_1e-3": 0.0, "auc": 1.0}
    assert verification_metrics_on_device(torch.tensor([0.5, 0.6]), torch.tensor([True, True])) is None
    assert verification_metrics_on_device(torch.tensor([0.5, 0.6]), torch.tensor([False, False])) is None


def test_verification_of_separated_and_one_class_scores():
    perfect = verification_metrics([0.9, 0.8, 0.1, 0.2, 0.3], [1, 1, 0, 0, 0])
    assert perfect == {"eer": 0.0, "fnmr_at_fmr_1e-2": 0.0, "fnmr_at_fmr_1e-3": 0.0, "auc": 1.0}
    assert verification_metrics([0.5, 0.6], [1, 1]) is None
    summary = summarise_verification([perfect, None, {k: 0.5 for k in perfect}])
    assert summary["mean"]["eer"] == pytest.approx(0.25) and summary["std"]["auc"] == pytest.approx(0.25)
    assert summary["splits"][1] is None


# ---- Cllr, PAV, ECE ------------------------------------------------------------------------------------
def test_cllr_matches_the_formula_and_its_fixed_points():
    llrs, same = gaussian_scores(n_same=50, n_different=150, seed=1)
    assert cllr(llrs, same) == pytest.approx(reference_cllr(llrs, same))
    assert cllr(np.zeros(10), [1] * 5 + [0] * 5) == pytest.approx(1.0)  # LR = 1: uninformative
    assert cllr([8.0, 9.0, -8.0, -9.0], [1, 1, 0, 0]) < 1e-7
    assert cllr([-2.0, 2.0], [1, 0]) > 1  # confidently wrong
    assert cllr([np.inf, -np.inf], [1, 0]) == 0.0


def test_cllr_min_and_cllr_cal_match_an_independent_pav():
    llrs, same = gaussian_scores(n_same=40, n_different=120, seed=2)
    llrs = np.round(0.7 * llrs - 0.3, 1)  # miscalibrated, with ties
    posterior = reference_pav_posterior(list(llrs), [int(s) for s in same])
    prior = math.log10(same.sum() / (~same).sum())
    with np.errstate(divide="ignore"):
        expected = np.log10(posterior) - np.log10(1 - np.array(posterior)) - prior
    assert np.allclose(pav_llr(llrs, same), expected, equal_nan=False)
    finite = np.isfinite(expected)
    hp = [math.log2(1 + 10 ** -v) if math.isfinite(v) else (0.0 if v > 0 else math.inf)
          for v, s in zip(expected, same) if s]
    hd = [math.log2(1 + 10 ** v) if math.isfinite(v) else (0.0 if v < 0 else math.inf)
          for v, s in zip(expected, same) if not s]
    assert finite.any()
    assert cllr_min(llrs, same) == pytest.approx(0.5 * (np.mean(hp) + np.mean(hd)))
    summary = validation_summary(llrs, same, llrs)
    assert summary["cllr"] == pytest.approx(reference_cllr(llrs, same))
    assert summary["cllr_cal"] == pytest.approx(summary["cllr"] - summary["cllr_min"]) and summary["cllr_cal"] >= 0
    assert summary["counts"] == {"pairs": 160, "same_source": 40, "different_source": 120}


def test_ece_at_even_odds_is_cllr():
    llrs, same = gaussian_scores(n_same=30, n_different=90, seed=4)
    ece = empirical_cross_entropy(llrs, same, [-1.0, 0.0, 1.0])
    assert ece[1] == pytest.approx(cllr(llrs, same))
    neutral = empirical_cross_entropy(np.zeros(len(same)), same, [-1.0, 0.0])
    p = 1 / (1 + 10)  # prior odds 1:10
    assert neutral[0] == pytest.approx(-(p * math.log2(p) + (1 - p) * math.log2(1 - p)))
    assert neutral[1] == pytest.approx(1.0)


# ---- ELUB ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_elub_matches_a_loop_over_thresholds(seed):
    scores, same = gaussian_scores(n_same=25, n_different=80, gap=1.0 + seed, seed=seed)
    llrs = np.round(scores * (1.0 + seed) - 0.5, 3)
    assert elub_bounds(llrs, same) == pytest.approx(reference_elub(list(llrs), list(same)), abs=1e-9)


def test_elub_of_perfectly_separated_lrs_is_set_by_the_counts():
    n_same, n_different = 20, 99
    lower, upper = elub_bounds(np.r_[np.full(n_same, 10.0), np.full(n_different, -10.0)],
                               np.r_[np.ones(n_same), np.zeros(n_different)])
    # above t the one added misleading pair of each class costs 1/(n_same+1) + 10^t/(n_different+1) > 1
    assert upper == pytest.approx(math.log10((n_different + 1) * n_same / (n_same + 1)), abs=0.011)
    assert lower == pytest.approx(-math.log10((n_same + 1) * n_different / (n_different + 1)), abs=0.011)


# ---- calibrators ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_calibrators_are_monotone_and_bounded(method):
    scores, same = gaussian_scores(seed=5)
    calibrator = fit_calibrator(method, scores / 4, same)  # cosine-like range
    grid = np.linspace(-2, 2, 2001)
    llr = calibrator.llr(grid)
    assert np.all(np.diff(llr) >= -1e-12)
    assert calibrator.lower <= llr.min() and llr.max() <= calibrator.upper
    assert calibrator.lower < 0 < calibrator.upper
    assert calibrator.upper <= math.log10((~same).sum() + 1) and calibrator.lower >= -math.log10(same.sum() + 1)
    assert np.isfinite(llr).all()


def test_logistic_calibration_recovers_the_true_lr_of_gaussian_scores():
    # same ~ N(1, 1), different ~ N(0, 1): ln LR(x) = x - 1/2 exactly
    scores, same = gaussian_scores(n_same=4000, n_different=4000, gap=1.0, seed=6)
    parameters = fit_calibrator("logistic", scores, same).parameters
    assert parameters["slope"] == pytest.approx(1 / math.log(10), rel=0.08)
    assert parameters["intercept"] == pytest.approx(-0.5 / math.log(10), abs=0.03)


def test_calibrator_file_round_trip_and_public_api(tmp_path):
    scores, same = gaussian_scores(seed=7)
    fitted = fit_calibrator("isotonic", scores, same)
    fitted.info = {"checkpoint": {"path": "x.pt", "sha256": "ab" * 32}}
    (tmp_path / "calibrator.json").write_text(json.dumps(fitted.to_dict()))
    loaded = handclip.load_calibrator(tmp_path)
    assert loaded.checkpoint_sha256 == "ab" * 32
    assert np.array_equal(loaded.llr(scores), fitted.llr(scores))
    with pytest.raises(UserError, match="NaN"):
        loaded.llr([0.5, float("nan")])


@pytest.mark.parametrize("content, expected", [(None, "not found"), ("{", "not a readable"),
                                               ('{"format": "x"}', "not a handclip calibrator"),
                                               ('{"format": "handclip-calibrator", "version": 1}', "malformed")])
def test_bad_calibrator_files_are_one_line_errors(tmp_path, content, expected):
    if content is not None:
        (tmp_path / "calibrator.json").write_text(content)
    with pytest.raises(UserError, match=expected):
        load_calibrator(tmp_path)


def test_calibration_refuses_one_class_and_nan():
    with pytest.raises(UserError, match="one class"):
        fit_calibrator("logistic", [0.1, 0.2, 0.3], [1, 1, 1])
    with pytest.raises(UserError, match="NaN"):
        fit_calibrator("kde", [0.1, np.nan, 0.3, 0.4], [1, 0, 1, 0])


# ---- subject-disjoint folds ----------------------------------------------------------------------------
def test_no_held_out_lr_comes_from_a_fit_on_its_own_subjects(monkeypatch):
    rng = np.random.default_rng(0)
    subjects = np.array([f"s{i}" for i in range(11) for _ in range(3)])
    first, second = np.triu_indices(len(subjects), 1)
    scores = np.arange(len(first), dtype=float)  # a pair's score is its index: fits reveal their pairs
    same = subjects[first] == subjects[second]
    calls = []

    class Spy:
        def __init__(self, trained_on):
            self.trained_on = trained_on

        def llr(self, held_out):
            calls.append((self.trained_on, held_out.astype(int)))
            return rng.normal(size=len(held_out))

    monkeypatch.setattr(calibration, "fit_calibrator", lambda method, s, y: Spy(s.astype(int)))
    llr = cross_validated_llr("logistic", scores, same, subjects[first], subjects[second], folds=4)
    assert len(calls) == 4 * 5 // 2
    held = np.concatenate([h for _, h in calls])
    assert sorted(held) == list(range(len(first)))  # every pair held out exactly once
    for trained_on, held_out in calls:
        fit_subjects = set(subjects[first[trained_on]]) | set(subjects[second[trained_on]])
        test_subjects = set(subjects[first[held_out]]) | set(subjects[second[held_out]])
        assert not fit_subjects & test_subjects
    assert np.isfinite(llr).all()


def test_folds_need_enough_subjects():
    assert sorted(subject_folds(["a", "b", "c", "d", "a"], 3, seed=1).values()) == [0, 0, 1, 2]
    with pytest.raises(UserError, match="at least 3"):
        subject_folds(["a", "b", "c"], 2)
    with pytest.raises(UserError, match="only 3 subjects"):
        subject_folds(["a", "b", "c"], 5)


# ---- verbal scale --------------------------------------------------------------------------------------
@pytest.mark.parametrize("lr, words", [
    (1.0, "no support for either proposition"), (1.99, "no support for either proposition"),
    (2.0, "weak support for the same-source proposition"), (10.0, "moderate support for the same-source proposition"),
    (999.0, "moderately strong support for the same-source proposition"),
    (1e3, "strong support for the same-source proposition"), (1e5, "very strong support for the same-source proposition"),
    (1e6, "extremely strong support for the same-source proposition"),
    (1 / 50, "moderate support for the different-source proposition"),
    (0.6, "no support for either proposition"),
])
def test_verbal_equivalents_follow_the_enfsi_bands(lr, words):
    assert verbal_equivalent(math.log10(lr)) == words
    assert handclip.forensic.verbal_equivalent(math.log10(lr)) == words


def test_verbal_equivalent_of_nan_is_an_error():
    with pytest.raises(ValueError):
        verbal_equivalent(float("nan"))
