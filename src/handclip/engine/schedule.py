"""Optimisers and learning-rate schedules built from :class:`~handclip.config.OptimConfig`."""
from __future__ import annotations

import math

import torch

from handclip.config import OptimConfig


# optim.optimizer → (groups, config, fused) → optimiser; the config's Literal lists these keys.
# adam: torch's Adam, whose weight decay is L2 added to the gradient (coupled; CLIP-HandID and
# CLIP-ReID); adamw: decay applied to the weights apart from the gradient (decoupled).
OPTIMIZERS = {
    "sgd": lambda groups, cfg, fused: torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                                      weight_decay=cfg.weight_decay),
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


def build_optimizer(param_groups: list[dict], cfg: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.optimizer](param_groups, cfg, fused)


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
