"""GPU speed without a GPU: a training step never waits for the device (no host read of a device
value, no op whose output size depends on values), the speed options (train.compile modes, fused
optimiser, lr scaling for larger batches) and attention through scaled_dot_product_attention.

On a CPU a "sync" cannot be timed, so it is detected where it starts: the Python calls that read a
tensor on the host (.item(), .tolist(), .cpu(), bool() ...) and, through the torch profiler, the
ops that force a GPU sync from C++ (_local_scalar_dense behind item/bool, nonzero behind
torch.where(mask) and boolean indexing, masked_select, unique).
"""
import contextlib
import threading
from pathlib import Path

import pytest
import torch

from handclip.config import OptimConfig, load_config
from handclip.engine.run import RunFolder
from handclip.engine.schedule import build_optimizer, scale_lr_to_batch, uses_fused_optimizer
from handclip.engine.state import compile_mode
from handclip.engine.trainer import Trainer
from handclip.errors import UserError

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
FAST = {"model.image_size": 64, "train.device": "cpu", "data.batch_size": 16, "data.k": 4, "optim.warmup_epochs": 0}
# Every augmentation and the loss terms of the reference recipes on, and a fused optimiser as on a
# GPU. SGD: the CPU kernels of fused Adam/AdamW read their step counter (a CPU tensor there) with
# item(), where the CUDA kernels read it on the device; the unfused loops keep it on the host.
EVERYTHING_ON = {"loss.center": 0.0005, "optim.optimizer": "sgd", "optim.fused": True, "optim.clip_grad": 1.0,
                 "data.augment.random_erasing": 0.5, "data.augment.erasing_fill": "noise",
                 "data.augment.color_jitter": 0.2, "data.augment.hflip": 0.5}
SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::masked_select",
            "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::equal"}
LOADER_THREAD = "handclip-batches"  # data.datasets.BatchLoader's reading thread
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def watch_host_syncs(monkeypatch):
    """Yields a dict that, after the block, holds ``reads`` (the host-read methods called, in
    order, outside the batch loader's thread, which fills host memory by design) and ``ops`` (the
    sync-forcing ops that ran)."""
    found = {"reads": [], "ops": set()}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            if not threading.current_thread().name.startswith(LOADER_THREAD):
                found["reads"].append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        yield found
    monkeypatch.undo()
    found["ops"] = {event.name for event in profile.events()} & SYNC_OPS


def make_trainer(synth_root, splits_dir, out, overrides=None):
    config = load_config(CONFIG, {**FAST, **(overrides or {})})
    invocation = {"data_root": str(synth_root), "splits": str(splits_dir), "init_from": None}
    return Trainer.for_run(config, RunFolder(out), invocation, quiet=True)


def test_a_training_step_never_reads_the_device(synth_root, splits_dir, tmp_path, monkeypatch):
    trainer = make_trainer(synth_root, splits_dir, tmp_path, EVERYTHING_ON)
    state = trainer.state
    state.sampler.set_epoch(0)
    batches = list(state.loader)[:4]
    generator = trainer.augment_generator(0)
    state.model.train()
    trainer.train_batch(*batches[0], generator)  # first step: optimiser state, lazy init
    with watch_host_syncs(monkeypatch) as found:
        results = [trainer.train_batch(indices, images, generator) for indices, images in batches[1:]]
    assert found == {"reads": [], "ops": set()}
    terms, logits, labels = results[-1]
    assert set(terms) == {"ce", "triplet", "center", "total"} and terms["triplet"].device == state.device
    assert logits.shape == (16, len(state.data.class_names)) and labels.shape == (16,)


def test_an_epoch_reads_the_device_once(synth_root, splits_dir, tmp_path, monkeypatch):
    trainer = make_trainer(synth_root, splits_dir, tmp_path, EVERYTHING_ON)
    trainer.train_epoch(0)
    with watch_host_syncs(monkeypatch) as found:
        row = trainer.train_epoch(1)
    assert len(trainer.state.sampler) >= 2
    assert found == {"reads": ["tolist"], "ops": set()}  # the epoch's sums, all at once
    assert row["loss"] > 0 and 0 <= row["train_acc"] <= 1 and row["loss_triplet"] >= 0


def test_the_watch_sees_a_sync(monkeypatch):
    """The former triplet (pytorch-metric-learning's miner and loss) waits for the device at every
    step: the watch above must catch it, or its silence proves nothing."""
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.losses import TripletMarginLoss
    from pytorch_metric_learning.miners import BatchHardMiner

    features, labels = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    distance = LpDistance(normalize_embeddings=False)
    with watch_host_syncs(monkeypatch) as found:
        TripletMarginLoss(distance=distance)(features, labels, BatchHardMiner(distance=distance)(features, labels))
    assert "aten::nonzero" in found["ops"]
    with watch_host_syncs(monkeypatch) as found:
        torch.ones(3).sum().item()
    assert found == {"reads": ["item"], "ops": {"aten::_local_scalar_dense", "aten::item"}}


def test_vit_attention_runs_through_scaled_dot_product_attention(synth_root, splits_dir, tmp_path):
    """open_clip's ViT blocks call nn.MultiheadAttention with need_weights=False, which is SDPA
    (flash / memory-efficient kernels on a GPU) in training too; nothing to switch on."""
    trainer = make_trainer(synth_root, splits_dir, tmp_path)
    trainer.state.model.train()
    images = torch.randn(4, 3, 64, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        trainer.state.model(images)
    calls = [event.name for event in profile.events()].count("aten::scaled_dot_product_attention")
    blocks = len(trainer.state.model.backbone.visual.transformer.resblocks)
    assert calls == blocks


# ---- the speed options ---------------------------------------------------------------------------
@pytest.mark.parametrize("setting, device, expected", [
    (False, "cpu", None), (True, "cpu", "default"), ("default", "cpu", "default"),
    ("max-autotune", "cpu", "max-autotune"), ("reduce-overhead", "cuda", "reduce-overhead"),
])
def test_compile_modes(setting, device, expected):
    assert compile_mode(setting, torch.device(device)) == expected


def test_cuda_graphs_fall_back_on_a_cpu_with_a_note(capsys):
    assert compile_mode("reduce-overhead", torch.device("cpu")) == "default"
    assert "CUDA graphs, which need a CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("key, value, message", [
    ("train.compile", "fast", "train.compile"),
    ("optim.fused", "yes", "optim.fused"),
    ("optim.lr_scaling", "cubic", "optim.lr_scaling"),
    ("optim.lr_batch_size", 0, "optim.lr_batch_size"),
])
def test_speed_options_refuse_unknown_values(key, value, message):
    with pytest.raises(UserError, match=message):
        load_config(CONFIG, {key: value})


def test_compiled_training_steps_like_eager(synth_root, splits_dir, tmp_path):
    """train.compile default on a CPU (inductor's C++ backend): same losses as eager, to float tolerance."""
    losses = {}
    for setting in (False, "default"):
        trainer = make_trainer(synth_root, splits_dir, tmp_path / str(setting),
                               {"train.compile": setting})
        state = trainer.state
        assert (state.forward is state.model) == (setting is False)
        state.model.train()
        state.sampler.set_epoch(0)
        indices = next(iter(state.sampler))
        images = state.augment(state.dataset.batch(indices), generator=torch.Generator().manual_seed(0))
        losses[setting] = [trainer.step(images, state.labels[indices])[0]["total"].item() for _ in range(3)]
    assert losses["default"] == pytest.approx(losses[False], rel=1e-3)


def test_fused_optimiser_steps_like_the_loop():
    results = {}
    for fused in (False, True):
        torch.manual_seed(0)
        layer = torch.nn.Linear(6, 3)
        optimizer = build_optimizer([{"params": layer.parameters(), "lr": 0.01}], OptimConfig(), fused=fused)
        for _ in range(3):
            optimizer.zero_grad()
            layer(torch.ones(2, 6)).square().sum().backward()
            optimizer.step()
        results[fused] = layer.weight.detach()
        assert optimizer.defaults["fused"] is (True if fused else None)
    torch.testing.assert_close(results[True], results[False])


def test_fused_optimiser_setting():
    assert uses_fused_optimizer(OptimConfig(), torch.device("cuda")) is True
    assert uses_fused_optimizer(OptimConfig(), torch.device("cpu")) is False
    assert uses_fused_optimizer(OptimConfig(fused=True), torch.device("cpu")) is True
    with pytest.raises(UserError, match="optim.fused"):
        uses_fused_optimizer(OptimConfig(fused=True), torch.device("meta"))


@pytest.mark.parametrize("scaling, factor", [("linear", 4.0), ("sqrt", 2.0)])
def test_lr_follows_the_batch_size(scaling, factor):
    groups = [{"params": [], "lr": 1e-5}, {"params": [], "lr": 1e-4, "name": "head"}]
    assert scale_lr_to_batch(groups, OptimConfig(), 256) == groups  # lr_batch_size null: as given
    scaled = scale_lr_to_batch(groups, OptimConfig(lr_batch_size=64, lr_scaling=scaling), 256)
    assert [g["lr"] for g in scaled] == pytest.approx([1e-5 * factor, 1e-4 * factor])
    assert scaled[1]["name"] == "head" and groups[0]["lr"] == 1e-5


def test_a_larger_pk_batch_keeps_k_and_scales_the_lr(synth_root, splits_dir, tmp_path):
    trainer = make_trainer(synth_root, splits_dir, tmp_path, {"data.batch_size": 32, "optim.lr_batch_size": 16})
    state = trainer.state
    state.sampler.set_epoch(0)
    batch = next(iter(state.sampler))
    counts = torch.bincount(state.labels[batch])
    assert len(batch) == 32 and set(counts[counts > 0].tolist()) == {4}  # P = 8 identities x K = 4
    assert [g["initial_lr"] for g in state.optimizer.param_groups][0] == pytest.approx(2 * 1e-3)
