"""Optimisers and learning-rate schedules built from :class:`~handclip.config.OptimConfig`."""
from __future__ import annotations

import math

import torch

from handclip.config import OptimConfig
from handclip.errors import UserError


# optim.optimizer → (groups, config, fused) → optimiser; the config's Literal lists these keys.
# adam: torch's Adam, whose weight decay is L2 added to the gradient (coupled; CLIP-HandID and
# CLIP-ReID); adamw: decay applied to the weights apart from the gradient (decoupled).
OPTIMIZERS = {
    "sgd": lambda groups, cfg, fused: torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                                      weight_decay=cfg.weight_decay, fused=fused or None),
    "adam": lambda groups, cfg, fused: torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                        fused=fused or None),
    "adamw": lambda groups, cfg, fused: torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                          fused=fused or None),
}
# optim.schedule → (epoch t past the warm-up, config, total epochs) → lr factor.
SCHEDULES = {
    "cosine": lambda t, cfg, total: 0.5 * (1 + math.cos(
        math.pi * (t - cfg.warmup_epochs) / max(total - cfg.warmup_epochs, 1))),
    "step": lambda t, cfg, total: cfg.gamma ** sum(t >= m for m in cfg.milestones),
    "constant": lambda t, cfg, total: 1.0,
}


# Device types torch's fused Adam, AdamW and SGD steps run on.
FUSED_DEVICE_TYPES = ("cuda", "cpu", "mps", "xpu")


def build_optimizer(param_groups: list[dict], cfg: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.optimizer](param_groups, cfg, fused)


def uses_fused_optimizer(cfg: OptimConfig, device: torch.device) -> bool:
    """``optim.fused``: auto is on for a GPU (on a CPU the loop is as fast and needs no new kernels)."""
    if cfg.fused == "auto":
        return device.type == "cuda"
    if cfg.fused and device.type not in FUSED_DEVICE_TYPES:
        raise UserError(f"config key 'optim.fused': torch has no fused optimiser step on {device.type}")
    return cfg.fused


def scale_lr_to_batch(param_groups: list[dict], cfg: OptimConfig, batch_size: int) -> list[dict]:
    """``optim.lr_batch_size``: every group's lr times (``batch_size`` / lr_batch_size), or its
    square root (``optim.lr_scaling: sqrt``); ``batch_size`` is the effective one (all processes)."""
    if cfg.lr_batch_size is None:
        return param_groups
    ratio = batch_size / cfg.lr_batch_size
    factor = ratio if cfg.lr_scaling == "linear" else math.sqrt(ratio)
    return [{**group, "lr": group["lr"] * factor} for group in param_groups]


def lr_factor(epoch: int, cfg: OptimConfig, total_epochs: int) -> float:
    """Multiplier of every group's base lr in ``epoch`` (0-based), read at ``epoch +
    schedule_offset``: linear warm-up from ``warmup_start_factor``, then cosine/step/constant."""
    t = epoch + cfg.schedule_offset
    if t < cfg.warmup_epochs:
        start = cfg.warmup_start_factor
        return start + (1 - start) * t / cfg.warmup_epochs
    return SCHEDULES[cfg.schedule](t, cfg, total_epochs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_epochs: int):
    """Stepped once per epoch; its state dict goes into the checkpoint."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(epoch, cfg, total_epochs))
