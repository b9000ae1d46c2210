"""Multi-process training on CPU with gloo: torchrun end to end, and processes that stay in step."""
import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from handclip.config import load_config
from handclip.engine import distributed
from handclip.engine.run import RunFolder
from handclip.engine.trainer import Trainer
from handclip.errors import UserError

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
# P×K = 4×4 batches: the synthetic dorsal_r train set then gives each of 2 processes 2 batches an epoch.
SMALL = {"model.image_size": 64, "data.batch_size": 16, "optim.warmup_epochs": 0, "train.device": "cpu"}


def test_torchrun_trains_with_two_processes(synth_root, splits_dir, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "handclip", "train", "--config", str(CONFIG), "--data", str(synth_root),
               "--splits", str(splits_dir), "--out", str(run), "--epochs", "3", "--quiet",
               *[f"--set={key}={value}" for key, value in SMALL.items()]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]

    with open(run / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]  # one row per epoch, not one per process
    losses = [float(r["loss"]) for r in rows]
    assert losses[-1] < losses[0], losses
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert not [p for p in run.rglob("*") if p.name.startswith(".")]  # no half-written files left
    assert json.loads((run / "env.json").read_text())["processes"] == 2


def _train_one_process(rank: int, port: int, synth_root, splits_dir, out: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    distributed.setup(torch.device("cpu"))
    try:
        # Center loss and ArcFace: parameters of the loss, outside the DDP model.
        config = load_config(CONFIG, {**SMALL, "train.epochs": 1, "loss.center": 0.0005, "loss.arcface": 1.0})
        trainer = Trainer.for_run(config, RunFolder(out / "run"), {"data_root": str(synth_root),
                                                                   "splits": str(splits_dir), "init_from": None},
                                  quiet=True)
        trainer.fit()
        # Parameters only: BatchNorm statistics differ after the last step until DDP's next forward.
        state = trainer.state
        torch.save({"model": dict(state.model.named_parameters()), "loss": state.loss_fn.state_dict(),
                    "first_batch": next(iter(state.sampler))}, out / f"rank{rank}.pt")
    finally:
        distributed.teardown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_processes_train_different_images_and_stay_identical(synth_root, splits_dir, tmp_path):
    mp.spawn(_train_one_process, args=(_free_port(), synth_root, splits_dir, tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert set(ranks[0]["first_batch"]).isdisjoint(ranks[1]["first_batch"])
    for part in ("model", "loss"):
        first, second = ranks[0][part], ranks[1][part]
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), part
    assert any("centers" in k for k in ranks[0]["loss"]) and any("W" in k for k in ranks[0]["loss"])
    initial = Trainer.for_run(load_config(CONFIG, {**SMALL, "loss.center": 0.0005, "loss.arcface": 1.0}),
                              RunFolder(tmp_path / "x"), {"data_root": str(synth_root), "splits": str(splits_dir),
                                                          "init_from": None}, quiet=True).state
    assert all(not torch.equal(initial.loss_fn.state_dict()[k], ranks[0]["loss"][k]) for k in ranks[0]["loss"])


def test_a_single_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model = torch.nn.Linear(2, 2)
    assert not distributed.launched() and not distributed.active()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.setup(torch.device("cpu")) == torch.device("cpu") and not distributed.active()
    assert distributed.wrap_model(model, torch.device("cpu")) is model
    model(torch.ones(1, 2)).sum().backward()
    before = model.weight.grad.clone()
    distributed.average_gradients(model.parameters())
    assert torch.equal(model.weight.grad, before)
    values = torch.tensor([1.0, 2.0])
    assert torch.equal(distributed.sum_over_processes(values), values)


def test_each_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.local_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert distributed.local_device(torch.device("cuda", 0)) == torch.device("cuda", 0)  # named explicitly
    assert distributed.local_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_torchrun_on_gpus_without_a_gpu_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(UserError, match="no CUDA GPU"):
        distributed.setup(torch.device("cuda"))
