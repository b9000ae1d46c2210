"""Progress output: bars on a terminal, one line per epoch or phase in a log."""
import io
import re
from pathlib import Path

from handclip import progress as progress_module
from handclip.engine.train import run_training
from handclip.progress import LineProgress, progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_one_line_per_item_with_its_values_and_nested_loops_stay_silent(capsys):
    bar = progress(range(2, 5), desc="train run", unit="epoch", per_item=True, initial=2, total=5)
    assert isinstance(bar, LineProgress)  # pytest's captured stderr is not a terminal
    for epoch in bar:
        for _ in progress(range(3), desc=f"epoch {epoch}", nested=True):
            pass
        bar.set_postfix(loss=1 / (epoch + 1), mAP="")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "train run: epoch 3/5  loss 0.3333", "train run: epoch 4/5  loss 0.25", "train run: epoch 5/5  loss 0.2"]


def test_a_phase_in_a_log_is_one_line_when_it_ends_and_nothing_when_disabled(capsys):
    assert list(progress(iter("abcd"), desc="decode images", unit="img")) == list("abcd")
    assert list(progress(range(3), desc="hidden", enabled=False)) == [0, 1, 2]
    err = capsys.readouterr().err
    assert re.fullmatch(r"decode images: 4 img in \d+\.\d s\n", err), err


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(progress_module.sys, "stderr", terminal)
    bar = progress(range(3), desc="train run", unit="epoch", per_item=True)
    assert list(bar) == [0, 1, 2]
    assert "\r" in terminal.getvalue() and "3/3" in terminal.getvalue()


def test_training_into_a_log_writes_one_line_per_epoch(synth_root, splits_dir, tmp_path, capsys):
    config = Path(__file__).parents[1] / "configs" / "tiny-cpu.yaml"
    run_training(config_path=config, overrides={"train.epochs": 3, "train.device": "cpu"},
                 data_root=synth_root, splits=splits_dir, out=tmp_path / "run")
    err = capsys.readouterr().err.splitlines()
    epochs = [line for line in err if line.startswith("train run: epoch")]
    assert [line.split()[3] for line in epochs] == ["1/3", "2/3", "3/3"]
    assert all("loss" in line and "mAP" in line for line in epochs)
    assert not any("\r" in line or "batch" in line for line in err)
    others = [line for line in err if line not in epochs]
    # besides, one line per image cache built (training and validation sizes), none per batch
    assert len(others) <= 2 and all(re.fullmatch(r"decode images: \d+ img in [\d.]+ s", line) for line in others)
