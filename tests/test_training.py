"""The training engine on tiny models: losses fall, freezing, resume after SIGKILL, init-from,
checkpoint safety, the Python API, and bad input."""
import csv
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import handclip
from handclip.cli import main
from handclip.config import load_config
from handclip.data.transforms import EvalTransform
from handclip.engine.checkpoint import load_checkpoint
from handclip.engine.run import RunFolder
from handclip.engine.train import run_training
from handclip.engine.trainer import Trainer
from handclip.errors import UserError

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
FAST = {"model.image_size": 64, "train.device": "cpu", "data.batch_size": 16, "data.k": 4, "optim.warmup_epochs": 0}


def make_trainer(synth_root, splits_dir, out, overrides=None, init_from=None):
    config = load_config(CONFIG, {**FAST, **(overrides or {})})
    invocation = {"data_root": str(synth_root), "splits": str(splits_dir),
                  "init_from": str(init_from) if init_from else None}
    return Trainer.for_run(config, RunFolder(out), invocation, quiet=True)


def history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_step_learns_a_batch(synth_root, splits_dir, tmp_path):
    """The public step on one batch, as train_epoch takes it (each loss term and the frozen weights
    are tested in test_losses.py and test_models.py)."""
    trainer = make_trainer(synth_root, splits_dir, tmp_path, {"loss.center": 0.0005})
    state = trainer.state
    state.sampler.set_epoch(0)
    indices = next(iter(state.sampler))
    images = EvalTransform(64, state.model.mean, state.model.std)(state.dataset.batch(indices))
    state.model.train()
    losses = [trainer.step(images, state.labels[indices])[0]["total"] for _ in range(20)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_run_folder_contents(tiny_run):
    for name in ("config.yaml", "env.json", "run.json", "classes.json", "history.csv",
                 "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (tiny_run / name).is_file(), name
    assert list((tiny_run / "plots").glob("*.png"))
    rows = history(tiny_run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"loss_ce", "loss_triplet", "loss", "lr", "train_acc", "val_rank1", "val_mAP", "img_per_s"} <= set(rows[0])
    payload = load_checkpoint(tiny_run / "checkpoints" / "best.pt")
    assert payload["class_names"] == sorted(payload["class_names"]) and len(payload["class_names"]) > 1
    assert float(rows[int(payload["epoch"])]["val_mAP"]) == max(float(r["val_mAP"]) for r in rows)


def test_existing_run_is_not_overwritten(tiny_run, synth_root, splits_dir):
    before = (tiny_run / "history.csv").read_bytes()
    with pytest.raises(UserError, match="--resume"):
        run_training(config_path=CONFIG, data_root=synth_root, splits=splits_dir, out=tiny_run)
    assert (tiny_run / "history.csv").read_bytes() == before


def _train_command(synth_root, splits_dir, out, epochs):
    return [sys.executable, "-m", "handclip", "train", "--config", str(CONFIG), "--data", str(synth_root),
            "--splits", str(splits_dir), "--out", str(out), "--epochs", str(epochs), "--quiet",
            *[f"--set={k}={v}" for k, v in FAST.items()]]


def test_resume_after_sigkill_matches_an_uninterrupted_run(synth_root, splits_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_train_command(synth_root, splits_dir, straight, 3), check=True, env=env)

    process = subprocess.Popen(_train_command(synth_root, splits_dir, killed, 3), env=env)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # somewhere inside epoch 2
    process.wait()
    assert main(["train", "--resume", str(killed), "--quiet"]) == 0

    assert [r["epoch"] for r in history(killed)] == ["1", "2", "3"]
    a = load_checkpoint(straight / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(killed / "checkpoints" / "last.pt")["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    losses = [float(r["loss"]) for r in history(killed)]
    assert losses == pytest.approx([float(r["loss"]) for r in history(straight)], rel=1e-4)


def test_resume_extends_to_more_epochs(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["train", "--resume", str(run), "--epochs", "3", "--quiet"]) == 0
    assert [r["epoch"] for r in history(run)] == ["1", "2", "3"]
    with pytest.raises(SystemExit):
        main(["train", "--resume"])
    assert main(["train", "--resume", str(run), "--set", "loss.center=1.0"]) == 2


def test_init_from_starts_a_new_strategy_from_earlier_weights(tiny_run, synth_root, splits_dir, tmp_path):
    source = load_checkpoint(tiny_run / "checkpoints" / "best.pt")["model"]
    trainer = make_trainer(synth_root, splits_dir, tmp_path / "next", {"model.image_size": None,
                                                                       "loss.center": 0.0005},
                           init_from=tiny_run / "checkpoints" / "best.pt")
    own = trainer.state.model.state_dict()
    backbone = [k for k in source if k.startswith("backbone.")]
    assert backbone and all(torch.equal(own[k], source[k]) for k in backbone)


def test_init_from_another_architecture_is_refused(tiny_run, synth_root, splits_dir, tmp_path):
    with pytest.raises(UserError, match="backbone does not fit"):
        make_trainer(synth_root, splits_dir, tmp_path, {"model.arch": "tiny-rn"},
                     init_from=tiny_run / "checkpoints" / "best.pt")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/handclip-pwned",))


def test_malicious_pickle_is_refused_without_running_it(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "handclip-checkpoint", "payload": _Exploit()}, path)
    if os.path.exists("/tmp/handclip-pwned"):
        os.unlink("/tmp/handclip-pwned")
    with pytest.raises(UserError, match="pickled code"):
        load_checkpoint(path)
    assert not os.path.exists("/tmp/handclip-pwned")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="not a handclip checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(UserError, match="not a handclip checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")


def test_load_model_encode_gives_unit_features(tiny_run, synth_root):
    model = handclip.load_model(tiny_run / "checkpoints" / "best.pt")
    paths = sorted((synth_root / "Hands").glob("*.jpg"))[:5]
    features = model.encode(paths, batch_size=2)
    assert features.shape == (5, model.dim)
    assert torch.allclose(features.norm(dim=1), torch.ones(5), atol=1e-5)
    from PIL import Image

    again = model.encode([Image.open(p) for p in paths])
    assert torch.allclose(features, again, atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--set", "model.arch=no-such-net"], "no-such-net"),
    (["--aspect", "palmar_l", "--splits", "{empty}"], "palmar_l"),
])
def test_bad_input_exits_2_with_one_line(args, message, synth_root, splits_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = [a.format(empty=tmp_path / "empty") for a in args]
    base = ["train", "--config", str(CONFIG), "--data", str(synth_root), "--splits", str(splits_dir),
            "--out", str(tmp_path / "run"), "--quiet"]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_corrupt_training_image_is_named(synth_root, splits_dir, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synth_root, root, ignore=shutil.ignore_patterns("splits"))
    shutil.copytree(splits_dir, root / "splits")
    victim = (root / "splits" / "dorsal_r" / "train.csv").read_text().splitlines()[1].split(",")[0]
    (root / victim).write_bytes(b"\xff\xd8\xff garbage")
    code = main(["train", "--config", str(CONFIG), "--data", str(root), "--splits", str(root / "splits"),
                 "--out", str(tmp_path / "run"), "--quiet", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and Path(victim).name in err and "Traceback" not in err


def test_cross_aspect_training_leaves_out_subjects_tested_in_any_aspect(synth_root, splits_dir, tmp_path):
    import shutil

    from handclip.data.manifests import load_split
    from handclip.data.training import load_training_data

    splits = tmp_path / "splits"
    shutil.copytree(splits_dir, splits)
    # a subject tested in dorsal_r but (as thresholds 1050/1051 allow) a training subject in palmar_r
    tested = load_split(synth_root, splits, "dorsal_r", "test")[0].identity
    donor = (splits / "palmar_r" / "train.csv").read_text().splitlines()[1].split(",")
    with open(splits / "palmar_r" / "train.csv", "a") as f:
        f.write(f"{donor[0]},{tested},palmar_r\n")
    single = load_training_data(synth_root, splits, ["palmar_r"])
    joint = load_training_data(synth_root, splits, ["dorsal_r", "palmar_r"])
    assert tested in {s.identity for s in single.train}
    assert tested not in {s.identity for s in joint.train + joint.val}
    assert {s.aspect for s in joint.train} == {"dorsal_r", "palmar_r"}
