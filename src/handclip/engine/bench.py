"""``handclip bench``: is the input path keeping up with the model?

On one aspect's training images and the configured model, it measures (images per second):

- ``model_only_img_s``: training steps on random tensors already on the device: the ceiling;
- ``train_e2e_img_s``: the trainer's real steps: cached loader → device → augmentation → step;
- ``jpeg_loader_img_s``: JPEG decoding (draft mode, ``data.num_workers`` DataLoader workers) and
  the training augmentation, without the cache;
- ``cached_loader_img_s``: the same batches and augmentation, read from the decoded-image cache;
- ``eval_extract_img_s``: feature extraction from the cache at ``train.eval_batch_size``;

and the two ratios with targets: end-to-end training within 10% of the model alone, and the
cached loader at least 3× the JPEG loader. Each figure leaves out a few warm-up steps
(compilation, cuDNN autotuning, worker start-up) and waits for the device at both ends of its
timed stretch. The JSON also records the device, the versions and the settings.
"""
from __future__ import annotations

import datetime
import itertools
import os
import platform
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from handclip.config import load_config
from handclip.data.datasets import BatchLoader, ImageDataset
from handclip.data.training import load_training_data
from handclip.engine.features import extract_features
from handclip.engine.state import TrainingState, build_training, training_device
from handclip.engine.trainer import Trainer
from handclip.errors import UserError
from handclip.fileio import atomic_write_json

WARMUP_STEPS = 3
TARGETS = {"train_e2e_over_model_only": 0.9, "cached_over_jpeg_loader": 3.0}
MEASURES = (  # JSON key, table label
    ("model_only_img_s", "model only (random tensors)"),
    ("train_e2e_img_s", "training end to end"),
    ("jpeg_loader_img_s", "JPEG loader + augmentation"),
    ("cached_loader_img_s", "cached loader + augmentation"),
    ("eval_extract_img_s", "evaluation feature extraction"),
)


def run_bench(config_path, overrides=None, data_root=None, splits=None, out=None, steps: int = 20) -> dict:
    """Measure, write ``out`` (JSON) and print a table; returns the result."""
    if steps < 1:
        raise UserError(f"--steps {steps}: must be at least 1")
    config = load_config(config_path, overrides)
    data = load_training_data(Path(data_root).resolve(), Path(splits).resolve(), config.data.aspects,
                              config.data.identity)
    result = measure(build_training(config, data, training_device(config)), steps)  # writes no run folder
    atomic_write_json(out, result)
    print(format_table(result))
    return result


def measure(state: TrainingState, steps: int) -> dict:
    trainer = Trainer(state, run=None, invocation={}, quiet=True)
    if state.uses_prompts:  # the i2t term needs the identity texts of stage 1
        state.text_features = trainer.learn_prompts()
    device, cfg = state.device, state.config
    batches = batch_plan(state.sampler, WARMUP_STEPS + steps)
    pin = device.type == "cuda"
    jpeg_dataset = ImageDataset(state.data.samples, size=state.dataset.size, cache=False)

    state.model.train()
    figures = {
        "model_only_img_s": images_per_second(model_steps(trainer, batches[0], WARMUP_STEPS + steps), device),
        "train_e2e_img_s": images_per_second(train_steps(trainer, BatchLoader(
            state.dataset, batches, cfg.data.num_workers, pin)), device),
        "jpeg_loader_img_s": images_per_second(augment_steps(trainer, BatchLoader(
            jpeg_dataset, batches, cfg.data.num_workers, pin)), device),
        "cached_loader_img_s": images_per_second(augment_steps(trainer, BatchLoader(
            state.dataset, batches, cfg.data.num_workers, pin)), device),
    }
    state.model.eval()
    figures["eval_extract_img_s"] = images_per_second(
        extract_steps(state, WARMUP_STEPS + steps), device)
    return {
        **figures,
        "ratios": {
            "train_e2e_over_model_only": figures["train_e2e_img_s"] / figures["model_only_img_s"],
            "cached_over_jpeg_loader": figures["cached_loader_img_s"] / figures["jpeg_loader_img_s"],
        },
        "targets": dict(TARGETS),
        "cache_build_s": state.images_seconds,
        "settings": {
            "arch": cfg.model.arch, "image_size": state.model.image_size, "stored_size": state.dataset.size,
            "source_image": "x".join(map(str, _image_size(state.data.samples[0].path))),
            "batch_size": len(batches[0]), "eval_batch_size": cfg.train.eval_batch_size,
            "num_workers": cfg.data.num_workers, "amp": cfg.train.amp, "compile": cfg.train.compile,
            "aspects": cfg.data.aspects, "images": len(state.dataset), "steps": steps,
            "warmup_steps": WARMUP_STEPS,
        },
        "device": device_details(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def batch_plan(sampler, count: int) -> list[np.ndarray]:
    """The sampler's first ``count`` batches, over as many epochs as that takes."""
    plan = []
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        for indices in sampler:
            plan.append(np.asarray(indices, dtype=np.int64))
            if len(plan) == count:
                return plan


# Each generator does one unit of work per step and yields how many images it handled.
def model_steps(trainer: Trainer, indices: np.ndarray, count: int) -> Iterator[int]:
    state = trainer.state
    size = state.model.image_size
    images = torch.randn(len(indices), 3, size, size, device=state.device)
    if state.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = state.labels[torch.as_tensor(indices)].to(state.device)
    for _ in range(count):
        trainer.step(images, labels)
        yield len(indices)


def train_steps(trainer: Trainer, loader: BatchLoader) -> Iterator[int]:
    generator = trainer.augment_generator(0)
    for indices, images in loader:
        trainer.train_batch(indices, images, generator)
        yield len(indices)


def augment_steps(trainer: Trainer, loader: BatchLoader) -> Iterator[int]:
    generator = trainer.augment_generator(0)
    for indices, images in loader:
        trainer.state.augment(images.to(trainer.state.device, non_blocking=True), generator=generator)
        yield len(indices)


def extract_steps(state: TrainingState, count: int) -> Iterator[int]:
    batch_size = state.config.train.eval_batch_size
    order = np.resize(np.arange(len(state.dataset)), batch_size * count)  # cycles through the images
    for start in range(0, len(order), batch_size):
        extract_features(state.encoder, state.dataset, order[start:start + batch_size], batch_size)
        yield batch_size


def images_per_second(steps: Iterator[int], device: torch.device, warmup: int = WARMUP_STEPS) -> float:
    """Throughput of the steps after the first ``warmup``, timed from a synchronised device to a
    synchronised device (GPU work is asynchronous)."""
    counted, started = 0, None
    for done, images in enumerate(steps, start=1):
        if done == warmup:
            _synchronize(device)
            started = time.perf_counter()
        elif done > warmup:
            counted += images
    if started is None or counted == 0:
        raise ValueError(f"need more than {warmup} steps to measure")
    _synchronize(device)
    return counted / (time.perf_counter() - started)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _image_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def device_details(device: torch.device) -> dict:
    details = {
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        details.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                       cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return details


def format_table(result: dict) -> str:
    settings, device = result["settings"], result["device"]
    where = device.get("gpu") or f"{device['cpu_cores']} CPU cores"
    lines = [f"{settings['arch']} at {settings['image_size']} px, batch {settings['batch_size']}, "
             f"{settings['source_image']} JPEGs, on {where}",
             f"{'measure':<32}{'img/s':>10}"]
    lines += [f"{label:<32}{result[key]:>10.1f}" for key, label in MEASURES]
    for name, target in result["targets"].items():
        ratio = result["ratios"][name]
        verdict = "met" if ratio >= target else "NOT met"
        lines.append(f"{name.replace('_', ' ')}: {ratio:.2f} (target >= {target:g}: {verdict})")
    return "\n".join(lines)
