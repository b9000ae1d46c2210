"""handclip calibrate / compare and evaluate's verification on synthetic hands with a trained tiny
model: files, values against independent computations, the done-when figures, and bad input."""
import base64
import dataclasses
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import handclip
from handclip.cli import main
from handclip.data.manifests import load_split, write_split_csv
from handclip.engine.checkpoint import checkpoint_config, load_checkpoint, save_checkpoint
from handclip.forensic.verbal import ENFSI_SCALE_SOURCE, verbal_equivalent
from handclip.metrics import pairwise_distance
from handclip.models.reid import build_reid_model

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
ASPECT = "dorsal_r"
CALIBRATION_FILES = ("calibrator.json", "validation.json", "llrs.npz", "validation.html", "tippett.png", "ece.png",
                     "pav.png")


@pytest.fixture(scope="module")
def trained(synth_root, splits_dir, tmp_path_factory):
    """A tiny-vit trained for 4 epochs on dorsal_r (the session's tiny_run has 2: too weak for LRs)."""
    from handclip.engine.train import run_training

    out = tmp_path_factory.mktemp("forensic") / "run"
    run_training(config_path=CONFIG, overrides={"train.epochs": 4, "train.device": "cpu"}, data_root=synth_root,
                 splits=splits_dir, out=out, quiet=True)
    return out / "checkpoints" / "best.pt"


@pytest.fixture(scope="module")
def untrained(trained, tmp_path_factory):
    """The same architecture and classes with its seeded random initial weights."""
    payload = load_checkpoint(trained)
    config = checkpoint_config(payload)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_reid_model(dataclasses.replace(config.model, pretrained="none"), len(payload["class_names"]))
    path = tmp_path_factory.mktemp("untrained") / "untrained.pt"
    save_checkpoint(path, model=model, config=config, class_names=payload["class_names"], epoch=0)
    return path


def calibrate(checkpoint, synth_root, splits, out, *args):
    return main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(synth_root), "--splits", str(splits),
                 "--aspect", ASPECT, "--out", str(out), "--device", "cpu", "--quiet", *map(str, args)])


@pytest.fixture(scope="module")
def calibrations(trained, untrained, synth_root, splits_dir, tmp_path_factory):
    """Logistic calibration folders of the trained and the untrained model."""
    root = tmp_path_factory.mktemp("calibrations")
    for name, checkpoint in (("trained", trained), ("untrained", untrained)):
        assert calibrate(checkpoint, synth_root, splits_dir, root / name) == 0
    return root


def read_json(path):
    return json.loads(Path(path).read_text())


def test_calibrate_writes_every_file_with_consistent_content(calibrations, trained, synth_root, splits_dir):
    out = calibrations / "trained"
    assert all((out / name).is_file() for name in CALIBRATION_FILES)
    calibrator, validation = read_json(out / "calibrator.json"), read_json(out / "validation.json")
    assert calibrator["checkpoint"]["sha256"] == hashlib.sha256(trained.read_bytes()).hexdigest()
    test = load_split(synth_root, splits_dir, ASPECT, "test")
    per_subject = Counter(s.identity for s in test)
    n = len(test)
    expected = {"images": n, "subjects": len(per_subject), "pairs": n * (n - 1) // 2,
                "same_source": sum(k * (k - 1) // 2 for k in per_subject.values())}
    expected["different_source"] = expected["pairs"] - expected["same_source"]
    assert calibrator["counts"] == expected
    assert calibrator["provenance"]["calibration_splits"] == ["test"] and calibrator["method"] == "logistic"
    with np.load(out / "llrs.npz") as data:
        llr, same = data["llr"], data["same"].astype(bool)
    assert len(llr) == expected["pairs"] and same.sum() == expected["same_source"]
    lower, upper = calibrator["bounds"]["log10_lr_lower"], calibrator["bounds"]["log10_lr_upper"]
    assert lower < 0 < upper
    # Cllr of the stored held-out LRs, by the formula
    cllr = 0.5 * (np.mean(np.log2(1 + 10.0 ** -llr[same])) + np.mean(np.log2(1 + 10.0 ** llr[~same])))
    assert validation["cllr"] == pytest.approx(cllr)
    assert validation["cllr_cal"] == pytest.approx(validation["cllr"] - validation["cllr_min"])
    assert validation["same_source_lr_above_1"] == pytest.approx(np.mean(llr[same] > 0))
    assert validation["counts"]["pairs"] == expected["pairs"] and validation["subjects"] == len(per_subject)
    html = (out / "validation.html").read_text()
    assert {"tippett.png", "ece.png", "pav.png"} <= set(re.findall(r'<img src="([^"]+)"', html))
    assert "Cllr_min" in html and calibrator["checkpoint"]["sha256"] in html


def test_trained_model_gives_better_lrs_than_an_untrained_one(calibrations, capsys):
    """The issue's done-when figures (printed: pytest -s shows them)."""
    trained = read_json(calibrations / "trained" / "validation.json")
    untrained = read_json(calibrations / "untrained" / "validation.json")
    with capsys.disabled():
        for name, v in (("trained", trained), ("untrained", untrained)):
            print(f"\n{name}: Cllr {v['cllr']:.3f} Cllr_min {v['cllr_min']:.3f} EER {v['eer']:.3f} "
                  f"same LR>1 {v['same_source_lr_above_1']:.3f} diff LR<1 {v['different_source_lr_below_1']:.3f}")
    assert trained["cllr"] < 1 and trained["cllr"] < untrained["cllr"]
    assert trained["same_source_lr_above_1"] > 0.5 and trained["different_source_lr_below_1"] > 0.5


@pytest.mark.parametrize("method", ["isotonic", "kde"])
def test_other_methods_calibrate_and_stay_bounded(method, trained, synth_root, splits_dir, tmp_path):
    assert calibrate(trained, synth_root, splits_dir, tmp_path / "cal", "--method", method, "--folds", "4") == 0
    calibrator = handclip.load_calibrator(tmp_path / "cal")
    llr = calibrator.llr(np.linspace(-1, 1, 201))
    assert calibrator.method == method and np.all(np.diff(llr) >= -1e-12)
    assert calibrator.lower <= llr.min() and llr.max() <= calibrator.upper
    validation = read_json(tmp_path / "cal" / "validation.json")
    assert validation["folds"] == 4 and 0 <= validation["cllr_min"] <= validation["cllr"]


def test_compare_reports_lrs_that_match_the_model_and_calibrator(calibrations, trained, synth_root, splits_dir,
                                                                 tmp_path):
    test = load_split(synth_root, splits_dir, ASPECT, "test")
    questioned, references = test[0], test[1:]
    out = tmp_path / "case"
    assert main(["compare", "--checkpoint", str(trained), "--calibration", str(calibrations / "trained"),
                 str(questioned.path), *[str(r.path) for r in references], "--out", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    comparison = read_json(out / "comparison.json")
    sha = lambda path: hashlib.sha256(Path(path).read_bytes()).hexdigest()  # noqa: E731
    assert comparison["questioned"] == {"image": str(questioned.path), "sha256": sha(questioned.path)}
    features = handclip.load_model(trained).encode([questioned.path] + [r.path for r in references])
    similarity = 1 - pairwise_distance(features[:1], features[1:])[0]
    calibrator = handclip.load_calibrator(calibrations / "trained")
    rows = comparison["comparisons"]
    assert [row["reference"] for row in rows] == [str(r.path) for r in references]
    for row, reference, score in zip(rows, references, similarity):
        assert row["sha256"] == sha(reference.path)
        assert row["score"] == pytest.approx(score, abs=1e-5)
        assert row["log10_lr"] == pytest.approx(float(calibrator.llr(score)), abs=1e-4)
        assert row["lr"] == pytest.approx(10 ** row["log10_lr"])
        assert row["verbal"] == verbal_equivalent(row["log10_lr"])
    assert comparison["checkpoint"]["sha256"] == sha(trained)
    assert comparison["calibrator"]["sha256"] == sha(calibrations / "trained" / "calibrator.json")
    assert comparison["verbal_scale"]["source"] == ENFSI_SCALE_SOURCE
    # the same synthetic person gets larger LRs than other people
    same = np.array([r.identity == questioned.identity for r in references])
    llr = np.array([row["log10_lr"] for row in rows])
    print(f"\ncompare: mean log10 LR same {llr[same].mean():.3f} ({same.sum()}), "
          f"different {llr[~same].mean():.3f} ({(~same).sum()})")
    assert llr[same].mean() > llr[~same].mean()
    html = (out / "report.html").read_text()
    for text in ("same person", "different people", ENFSI_SCALE_SOURCE, comparison["checkpoint"]["sha256"],
                 comparison["calibrator"]["sha256"], comparison["questioned"]["sha256"], handclip.__version__,
                 "Cllr"):
        assert text in html, text
    assert html.count("data:image/jpeg;base64,") == 1 + len(references)
    tippett = (out / "tippett_case.png").read_bytes()  # also embedded: the page is one file to hand on
    assert re.findall(r'<img src="data:image/png;base64,([^"]+)"', html) == [base64.b64encode(tippett).decode()]
    assert all(src.startswith("data:") for src in re.findall(r'<img src="([^"]+)"', html))


def test_evaluate_reports_verification_and_saves_scores(trained, synth_root, splits_dir, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(trained), "--data", str(synth_root), "--splits", str(splits_dir),
                 "--aspect", ASPECT, "--num-splits", "2", "--save-scores", "--out", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    result = read_json(out / "results.json")
    model = handclip.load_model(trained)
    for i, split in enumerate(result["verification"]["splits"]):
        query = load_split(synth_root, splits_dir, ASPECT, f"query_{i}")
        gallery = load_split(synth_root, splits_dir, ASPECT, f"gallery_{i}")
        scores = 1 - pairwise_distance(model.encode([s.path for s in query]), model.encode([s.path for s in gallery]))
        same = np.array([[q.identity == g.identity for g in gallery] for q in query])
        wins = (scores[same][:, None] > scores[~same][None, :]) + 0.5 * (scores[same][:, None] == scores[~same][None, :])
        assert split["auc"] == pytest.approx(wins.mean(), abs=1e-3)
        far = np.array([(scores[~same] >= t).mean() for t in np.sort(scores.ravel())])
        frr = np.array([(scores[same] < t).mean() for t in np.sort(scores.ravel())])
        # the interpolated EER lies between the operating points either side of FMR = FNMR
        assert np.max(np.minimum(far, frr)) - 1e-9 <= split["eer"] <= np.min(np.maximum(far, frr)) + 1e-9
        with np.load(out / f"scores_{i}.npz") as saved:
            assert list(saved["query_images"]) == [s.image for s in query]
            assert saved["score"] == pytest.approx(scores[saved["query"], saved["gallery"]], abs=1e-5)
            assert np.array_equal(saved["same"].astype(bool), same[saved["query"], saved["gallery"]])
    assert result["verification"]["mean"]["auc"] == pytest.approx(
        np.mean([s["auc"] for s in result["verification"]["splits"]]))
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[-4:] == ["eer", "fnmr_at_fmr_1e-2", "fnmr_at_fmr_1e-3", "auc"]
    html = (out / "report.html").read_text()
    assert "Verification" in html and {"det.png", "scores.png"} <= set(re.findall(r'<img src="([^"]+)"', html))


# ---- bad input: exit 2, one line, nothing written ----------------------------------------------------------
def custom_splits(tmp_path, samples):
    splits = tmp_path / "splits"
    write_split_csv(splits / ASPECT / "test.csv", samples)
    return splits


def nan_checkpoint(trained, tmp_path):
    payload = torch.load(trained, weights_only=True)
    for tensor in payload["model"].values():
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
    path = tmp_path / "nan.pt"
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("case", ["few-same-source", "one-class", "nan-scores", "trained-subjects", "folds"])
def test_bad_calibration_sets_exit_2(case, trained, synth_root, splits_dir, tmp_path, capsys):
    test = load_split(synth_root, splits_dir, ASPECT, "test")
    checkpoint, splits, extra = trained, splits_dir, []
    if case == "few-same-source":
        by_subject = {}
        for sample in test:
            by_subject.setdefault(sample.identity, []).append(sample)
        kept = [s for images in by_subject.values() for s in images[:2]]  # one same-source pair per subject
        splits, expected = custom_splits(tmp_path, kept), f"has {len(by_subject)} same-source pairs; at least 30"
    elif case == "one-class":
        splits, expected = custom_splits(tmp_path, [s for s in test if s.identity == test[0].identity]), "one class"
    elif case == "nan-scores":
        checkpoint, expected = nan_checkpoint(trained, tmp_path), "NaN"
    elif case == "trained-subjects":
        extra, expected = ["--calibration-splits", "train"], "training identities"
    else:
        extra, expected = ["--folds", "50"], "--folds 50"
    out = tmp_path / "cal"
    code = calibrate(checkpoint, synth_root, splits, out, *extra)
    err = capsys.readouterr().err
    assert code == 2 and expected in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("case", ["foreign-calibrator", "not-an-image", "missing-calibrator"])
def test_bad_compare_input_exits_2(case, calibrations, trained, synth_root, splits_dir, tmp_path, capsys):
    test = load_split(synth_root, splits_dir, ASPECT, "test")
    questioned, calibration = test[0].path, calibrations / "trained"
    if case == "foreign-calibrator":
        calibration, expected = calibrations / "untrained", "another checkpoint"
    elif case == "not-an-image":
        questioned = tmp_path / "questioned.jpg"
        questioned.write_text("not a photo")
        expected = "questioned.jpg"
    else:
        calibration, expected = tmp_path / "nowhere", "not found"
    out = tmp_path / "case"
    code = main(["compare", "--checkpoint", str(trained), "--calibration", str(calibration), str(questioned),
                 str(test[1].path), "--out", str(out), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_an_unrelated_out_folder_is_never_replaced(calibrations, trained, synth_root, splits_dir, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert calibrate(trained, synth_root, splits_dir, out) == 2
    assert "not an earlier output" in capsys.readouterr().err and (out / "notes.txt").read_text() == "keep me"
