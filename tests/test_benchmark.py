"""handclip benchmark: tiny preset on synthetic 11k and a fake HD tree; leaderboard, resume, bad input."""
import json
import shutil
from pathlib import Path

import pytest

from handclip.cli import main
from handclip.engine import benchmark
from handclip.engine.trainer import Trainer
from handclip.published import for_aspect

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"


@pytest.fixture
def data_11k(synth_root, tmp_path):
    """A copy of the synthetic 11k set without splits: the benchmark prepares them."""
    root = tmp_path / "11k"
    shutil.copytree(synth_root, root, ignore=shutil.ignore_patterns("splits"))
    return root


@pytest.fixture
def data_hd(hd_root, tmp_path):
    root = tmp_path / "HD"
    shutil.copytree(hd_root, root, ignore=shutil.ignore_patterns("splits"))
    return root


def run(out, *args) -> int:
    return main(["benchmark", "--config", str(CONFIG), "--out", str(out), "--num-splits", "2", "--device", "cpu",
                 "--quiet", *map(str, args)])


def file_times(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_leaderboard_of_11k_and_hd_and_a_second_call_redoes_nothing(data_11k, data_hd, tmp_path):
    out = tmp_path / "bench"
    assert run(out, "--data-11k", data_11k, "--data-hd", data_hd, "--aspects", "dorsal_r,hd", "--epochs", 1) == 0
    for root in (data_11k, data_hd):
        assert json.loads((root / "splits" / "manifest.json").read_text())["num_splits"] == 2

    board = json.loads((out / "leaderboard.json").read_text())
    ours = [row for row in board["rows"] if not row["published"]]
    assert [(row["aspect"], row["dataset"]) for row in ours] == [("dorsal_r", "11k"), ("hd", "hd")]
    for row in ours:
        result = json.loads((out / "eval" / row["aspect"] / "results.json").read_text())
        assert row["protocol"] == result["protocol"] == "published" and result["num_splits"] == 2
        for key in ("rank1", "mAP", "mAP_trapezoid", "mINP"):
            assert row[key] == result["mean"][key] and row["std"][key] == result["std"][key]
        assert (out / "runs" / row["aspect"] / "checkpoints" / "best.pt").is_file()
    papers = [row for row in board["rows"] if row["published"]]
    assert len(papers) == len(for_aspect("dorsal_r")) + len(for_aspect("hd"))
    (mba,) = [r for r in papers if r["aspect"] == "dorsal_r" and r["method"] == "MBA-Net"]
    assert (mba["protocol"], mba["rank1"], mba["mAP"], mba["mAP_trapezoid"]) == ("published", 0.9745, None, 0.9798)
    (thesis,) = [r for r in papers if r["method"].startswith("CLIP-FH")]
    assert (thesis["protocol"], thesis["mAP"], thesis["mAP_trapezoid"]) == ("single-aspect", 0.922, None)

    seconds = board["seconds"]
    phases = ["prepare_11k", "prepare_hd", "train_dorsal_r", "evaluate_dorsal_r", "train_hd", "evaluate_hd"]
    parts = {f"evaluate_{a}_{part}" for a in ("dorsal_r", "hd") for part in ("encode", "after_encoding")}
    assert [k for k in seconds if k not in parts] == phases + ["total"] and parts <= set(seconds)
    assert all(seconds[p] >= 0 for p in phases) and seconds["total"] >= sum(seconds[p] for p in phases) - 0.5
    for aspect in ("dorsal_r", "hd"):  # the evaluation's own parts: encoding once, then every split's metrics
        encode, after = seconds[f"evaluate_{aspect}_encode"], seconds[f"evaluate_{aspect}_after_encoding"]
        assert 0 <= encode and 0 <= after and encode  # seconds rounded to 0.1 + after <= seconds[f"evaluate_{aspect}"] + 0.1
        result = json.loads((out / "eval" / aspect / "results.json").read_text())
        assert result["seconds"]["after_encoding"] == pytest.approx(after, abs=0.05)
    markdown = (out / "leaderboard.md").read_text()
    assert "MBA-Net (paper)" in markdown and "97.45" in markdown and "`published`:" in markdown
    assert "evaluate_hd" in markdown

    before = file_times(out / "runs") | file_times(out / "eval")
    splits_before = file_times(data_11k / "splits")
    assert run(out, "--data-11k", data_11k, "--data-hd", data_hd, "--aspects", "dorsal_r,hd", "--epochs", 1) == 0
    assert file_times(out / "runs") | file_times(out / "eval") == before
    assert file_times(data_11k / "splits") == splits_before
    assert json.loads((out / "leaderboard.json").read_text())["rows"] == board["rows"]


def test_a_killed_benchmark_resumes_where_it_stopped(data_11k, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench"
    args = ("--data-11k", data_11k, "--aspects", "dorsal_r", "--epochs", 2)
    trained = []
    real_train_epoch, real_end_epoch, real_evaluate = Trainer.train_epoch, Trainer.record_epoch, benchmark.run_evaluate

    def train_epoch(self, epoch):
        trained.append(epoch)
        return real_train_epoch(self, epoch)

    def killed_after_first_epoch(self, epoch, row):
        real_end_epoch(self, epoch, row)
        raise KeyboardInterrupt

    def killed_after_evaluating(options):
        real_evaluate(options)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "record_epoch", killed_after_first_epoch)
        assert run(out, *args) == 130
    assert trained == [0] and not (out / "eval").exists()

    with monkeypatch.context() as patch:
        patch.setattr(benchmark, "run_evaluate", killed_after_evaluating)
        assert run(out, *args) == 130
    assert trained == [0, 1]  # the run continued from its last epoch
    assert not (out / "eval" / "dorsal_r").exists() and not (out / "leaderboard.json").exists()

    assert run(out, *args) == 0
    assert trained == [0, 1]  # finished run: evaluated, not trained again
    history = (out / "runs" / "dorsal_r" / "history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["1", "2"]
    board = json.loads((out / "leaderboard.json").read_text())
    assert [r["aspect"] for r in board["rows"] if not r["published"]] == ["dorsal_r"]
    assert {"train_dorsal_r", "evaluate_dorsal_r", "total"} <= set(board["seconds"])

    capsys.readouterr()
    assert run(out, "--data-11k", data_11k, "--aspects", "dorsal_r", "--epochs", 3) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and err.count("\n") == 1


@pytest.mark.parametrize("case", ["empty-11k-root", "hd-without-root", "not-an-hd-root", "unknown-aspect",
                                  "too-few-splits", "no-data"])
def test_bad_input_exits_2_with_one_line(case, synth_root, splits_dir, tmp_path, capsys):
    assert (synth_root / "splits") == splits_dir  # 3 splits there: the benchmark must not prepare its own
    empty = tmp_path / "empty"
    empty.mkdir()
    args, expected = {
        "empty-11k-root": (["--data-11k", empty], "HandInfo.csv"),
        "hd-without-root": (["--data-11k", synth_root, "--aspects", "dorsal_r,hd"], "--data-hd"),
        "not-an-hd-root": (["--data-hd", empty], "Original Images"),
        "unknown-aspect": (["--data-11k", synth_root, "--aspects", "dorsal_x"], "dorsal_x"),
        "too-few-splits": (["--data-11k", synth_root, "--aspects", "dorsal_r", "--num-splits", "5"], "splits"),
        "no-data": ([], "--data-11k"),
    }[case]
    code = main(["benchmark", "--config", str(CONFIG), "--out", str(tmp_path / "bench"), "--quiet", *map(str, args)])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "bench").exists()


def test_a_bad_flag_is_one_line_too(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["benchmark", "--out", str(tmp_path / "bench")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err == "handclip: error: benchmark: the following arguments are required: --config\n"
