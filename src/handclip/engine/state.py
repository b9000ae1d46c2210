"""Everything one training holds, built in one place: ``build_training`` returns a
``TrainingState`` (model, loss, optimisers, scheduler, images, sampler, loader, augmentation),
which ``engine.trainer.Trainer`` steps through its epochs and ``engine.run.RunFolder`` saves and
restores."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Callable

import torch

from handclip.config import Config
from handclip.data.datasets import BatchLoader, ImageDataset
from handclip.data.samplers import PKSampler, RandomBatchSampler
from handclip.data.subjects import merge_records, subject_record
from handclip.data.training import TrainingData
from handclip.data.transforms import TrainTransform
from handclip.engine import distributed
from handclip.engine.checkpoint import FROZEN_TEXT_PREFIX, checkpoint_architecture, load_checkpoint
from handclip.engine.encoder import Encoder, resolve_device
from handclip.engine.schedule import build_optimizer, build_scheduler, scale_lr_to_batch, uses_fused_optimizer
from handclip.errors import UserError
from handclip.losses.combined import ReIDLoss
from handclip.models.reid import ReIDModel, build_reid_model


@dataclass
class TrainingState:
    config: Config  # as resolved by the build ("auto" choices made)
    data: TrainingData
    device: torch.device
    model: ReIDModel
    forward: Callable  # the model as a step calls it (DDP, compiled)
    loss_fn: ReIDLoss
    optimizer: torch.optim.Optimizer
    center_optimizer: torch.optim.Optimizer | None
    scheduler: torch.optim.lr_scheduler.LRScheduler
    augment: TrainTransform
    encoder: Encoder
    dataset: ImageDataset  # train then val images, stored at train_cache_size
    labels: torch.Tensor  # class index of each train image
    sampler: PKSampler | RandomBatchSampler
    loader: BatchLoader
    channels_last: bool
    uses_prompts: bool  # CLIP-ReID: identity texts learned before the first epoch
    trained_subjects: dict
    text_features: torch.Tensor | None = None  # learned identity text features, (classes, E)
    best_metrics: dict = field(default_factory=dict)
    images_seconds: float = 0.0  # opening the image cache (decoding unless an earlier run did)
    cuda_graphs: bool = False  # train.compile reduce-overhead on a GPU: each step replays CUDA graphs

    def training_state(self, epoch: int) -> dict:
        """What last.pt holds besides the weights, for resume."""
        state = {"epoch": epoch, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "loss": self.loss_fn.state_dict(),
                 "best_metrics": dict(self.best_metrics)}
        if self.text_features is not None:
            state["text_features"] = self.text_features.cpu()
        if self.center_optimizer is not None:
            state["center_optimizer"] = self.center_optimizer.state_dict()
        return state

    def load_training_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loss_fn.load_state_dict(state["loss"])
        if self.center_optimizer is not None and "center_optimizer" in state:
            self.center_optimizer.load_state_dict(state["center_optimizer"])
        self.best_metrics = dict(state.get("best_metrics", {}))
        if "text_features" in state:
            self.text_features = state["text_features"].to(self.device)


def training_device(config: Config) -> torch.device:
    """This process's device (its own GPU under torchrun)."""
    device = distributed.local_device(resolve_device(config.train.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device '{config.train.device}': no CUDA GPU is available here")
    return device


def build_training(config: Config, data: TrainingData, device: torch.device, init_from: str | Path | None = None,
                   quiet: bool = True) -> TrainingState:
    torch.manual_seed(config.train.seed)
    uses_prompts = config.prompt.stage1_epochs > 0 or config.loss.i2t > 0
    model = build_reid_model(config.model, num_classes=len(data.class_names), keep_text=uses_prompts).to(device)
    # The config saved with the run says what "auto" became, so a rebuild needs no weights.
    config = replace(config, model=replace(config.model, quick_gelu=model.backbone.quick_gelu))
    trained_subjects = subject_record(data.samples)
    if init_from:
        trained_subjects = merge_records(trained_subjects, init_weights(model, Path(init_from)))
    loss_fn = ReIDLoss(config.loss, len(data.class_names), model.feature_dims, with_text=uses_prompts).to(device)
    groups = model.param_groups(config.optim)
    loss_params = [p for p in loss_fn.non_center_parameters() if p.requires_grad]
    if loss_params:
        groups.append({"params": loss_params, "lr": config.optim.lr * config.optim.head_lr_mult, "name": "loss"})
    groups = scale_lr_to_batch(groups, config.optim, config.data.batch_size * distributed.world_size())
    optimizer = build_optimizer(groups, config.optim, fused=uses_fused_optimizer(config.optim, device))
    centers = list(loss_fn.center_parameters())
    channels_last = device.type == "cuda" and model.backbone.kind == "rn"
    started = time.perf_counter()
    dataset = ImageDataset(data.samples, size=train_cache_size(config, model.image_size), cache=config.data.cache,
                           progress=not quiet)
    images_seconds = time.perf_counter() - started
    sampler = make_sampler(config, data)
    mode = compile_mode(config.train.compile, device)
    return TrainingState(
        config=config, data=data, device=device, model=model,
        forward=_training_forward(model, device, channels_last, mode),
        loss_fn=loss_fn, optimizer=optimizer,
        center_optimizer=torch.optim.SGD(centers, lr=config.loss.center_lr) if centers else None,
        scheduler=build_scheduler(optimizer, config.optim, config.train.epochs),
        augment=TrainTransform(model.image_size, config.data.augment, model.mean, model.std),
        encoder=Encoder(model, device=device, amp=config.train.amp),
        dataset=dataset, labels=torch.tensor(data.labels), sampler=sampler,
        loader=BatchLoader(dataset, sampler, config.data.num_workers, pin_memory=device.type == "cuda"),
        channels_last=channels_last, uses_prompts=uses_prompts, trained_subjects=trained_subjects,
        images_seconds=images_seconds, cuda_graphs=mode == "reduce-overhead")


# Training images are stored this much above the model's input (256 for 224), room for the random crop.
STORED_OVER_INPUT = Fraction(8, 7)


def train_cache_size(config: Config, image_size: int) -> int:
    """The stored side of training images: ``data.cache_size``, else ``data.augment.resize`` (the
    random crop then reads the stored pixels), else ``STORED_OVER_INPUT`` × the model's input."""
    return config.data.cache_size or config.data.augment.resize or round(image_size * STORED_OVER_INPUT)


def input_size_of_stored(stored: int) -> int:
    """The model input whose default stored training side is ``stored`` (224 for 256)."""
    return round(stored / STORED_OVER_INPUT)


def make_sampler(config: Config, data: TrainingData) -> PKSampler | RandomBatchSampler:
    cfg = config.data
    ranks = {"rank": distributed.rank(), "world_size": distributed.world_size()}
    if cfg.sampler == "pk":
        groups = [s.aspect for s in data.train] if cfg.aspect_balanced else None
        return PKSampler(data.labels, cfg.batch_size, cfg.k, seed=config.train.seed, group_of=groups, **ranks)
    return RandomBatchSampler(len(data.train), cfg.batch_size, seed=config.train.seed,
                              drop_last=len(data.train) >= cfg.batch_size * ranks["world_size"], **ranks)


def compile_mode(setting: bool | str, device: torch.device) -> str | None:
    """``train.compile`` as a torch.compile mode (None: not compiled). CUDA graphs
    (reduce-overhead) exist on CUDA devices only: elsewhere the default mode, with a note."""
    if setting is False:
        return None
    mode = "default" if setting is True else setting
    if mode == "reduce-overhead" and device.type != "cuda":
        if distributed.is_main():
            print(f"handclip: note: train.compile reduce-overhead adds CUDA graphs, which need a CUDA device; "
                  f"compiling in the default mode on {device.type}", file=sys.stderr)
        return "default"
    return mode


def _training_forward(model: ReIDModel, device: torch.device, channels_last: bool, mode: str | None) -> Callable:
    """The model as a training step calls it: in DistributedDataParallel under torchrun, compiled
    in ``mode`` (train.compile; None: eager); ResNets channels-last on a GPU (tensor-core convolutions).
    CUDA graphs need fixed shapes: P x K batches always have them, shuffled ones drop the last batch
    (``make_sampler``) unless the training set is smaller than one batch."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: find the fastest kernels once
        torch.set_float32_matmul_precision("high")  # TF32 for float32 matmuls outside autocast
    if channels_last:
        model.to(memory_format=torch.channels_last)
    forward = distributed.wrap_model(model, device)
    return torch.compile(forward, mode=mode) if mode else forward


def init_weights(model: torch.nn.Module, path: Path) -> dict:
    """--init-from: take every weight whose name and shape fit (the backbone must fit whole);
    new heads (another class map, another head) start fresh. Returns the subjects the checkpoint
    was trained on ({} with a warning for a checkpoint of an older handclip, which has no record)."""
    payload = load_checkpoint(path)
    earlier = checkpoint_architecture(payload)["quick_gelu"]
    if earlier != model.backbone.quick_gelu:
        raise UserError(f"{path}: its backbone was trained with model.quick_gelu {str(earlier).lower()}, this "
                        f"config builds {str(model.backbone.quick_gelu).lower()}; set model.quick_gelu="
                        f"{str(earlier).lower()}")
    own = model.state_dict()
    fitting = {k: v for k, v in payload["model"].items() if k in own and own[k].shape == v.shape}
    backbone_keys = [k for k in own if k.startswith("backbone.") and not k.startswith(FROZEN_TEXT_PREFIX)]
    missing = [k for k in backbone_keys if k not in fitting]
    if missing:
        raise UserError(f"{path}: its backbone does not fit model.arch '{payload['config']['model']['arch']}' → "
                        f"this config (first mismatch '{missing[0]}')")
    model.load_state_dict(fitting, strict=False)
    if payload.get("trained_subjects") is None:
        if distributed.is_main():
            print(f"handclip: warning: {path}: no record of the subjects it was trained on (a checkpoint of an older "
                  f"handclip); this run's checkpoints record only its own", file=sys.stderr)
        return {}
    return payload["trained_subjects"]
