"""The loss terms, one small module each, and ``LOSS_TERMS``: the table ``ReIDLoss`` builds from.

Every term is called the same way: ``term(inputs, labels) -> scalar``, where ``inputs`` is the
model's output dict (``logits``: per-branch (B, C), ``metric``: per-branch (B, D_i), ``global``)
plus ``text_logits`` (B, classes) when identity texts exist. A per-branch loss (``(x, labels) ->
scalar`` on one branch's tensor) becomes a term through ``OverBranches``, the one place where
branches are averaged or summed (``loss.branch_reduction``).

Adding a term: a ``LossConfig`` weight (and its settings), its module here, one ``LOSS_TERMS`` entry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import ArcFaceLoss, SupConLoss
from torch import nn

from handclip.config import LossConfig
from handclip.losses.center import CenterLoss


class OverBranches(nn.Module):
    """A per-branch loss over every branch of ``inputs[key]``: their mean or their sum. One
    module per branch (``branches``: class centers and ArcFace weights are per branch) or one
    shared by all (``shared``)."""

    def __init__(self, key: str, reduction: str, branches: list[nn.Module] | None = None,
                 shared: nn.Module | None = None):
        super().__init__()
        self.key, self.reduction = key, reduction
        self.branches = nn.ModuleList(branches) if branches is not None else None
        self.shared = shared

    def forward(self, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        values = inputs[self.key]
        losses = self.branches if self.branches is not None else [self.shared] * len(values)
        stacked = torch.stack([loss(x.float(), labels) for loss, x in zip(losses, values)])
        return stacked.sum() if self.reduction == "sum" else stacked.mean()


class SmoothedCrossEntropy(nn.Module):
    def __init__(self, label_smoothing: float):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)


class BatchHardTriplet(nn.Module):
    """Batch-hard triplet on the Euclidean distance of the un-normalised features, averaged over
    all anchors (BoT's mean; PML's default would average only the non-zero triplets); soft:
    ``softplus(d_ap - d_an)`` instead of ``relu(d_ap - d_an + margin)``.

    The result of pytorch-metric-learning's ``BatchHardMiner`` + ``TripletMarginLoss`` with
    ``LpDistance(normalize_embeddings=False)`` and a ``MeanReducer``, computed with masks on the
    whole (B, B) distance matrix instead of index lists: PML's ``torch.where`` and ``len(...)``
    wait for the GPU at every step, this never does. Anchors without a positive or a negative in
    the batch take no part (0 when none has both, with a graph)."""

    def __init__(self, margin: float, soft: bool):
        super().__init__()
        self.margin, self.soft = margin, soft

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dist = torch.cdist(features, features)
        same = labels[:, None] == labels[None, :]
        positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        hardest_positive = dist.masked_fill(~positive, -math.inf).max(dim=1).values
        hardest_negative = dist.masked_fill(same, math.inf).min(dim=1).values
        anchors = positive.any(dim=1) & ~same.all(dim=1)
        violation = hardest_positive - hardest_negative
        losses = F.softplus(violation) if self.soft else F.relu(violation + self.margin)
        return torch.where(anchors, losses, 0.0).sum() / anchors.sum().clamp(min=1)


class TextCrossEntropy(nn.Module):
    """CLIP-ReID stage 2: smoothed cross-entropy of the image-to-text logits against the labels."""

    def __init__(self, label_smoothing: float):
        super().__init__()
        self.cross_entropy = SmoothedCrossEntropy(label_smoothing)

    def forward(self, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        if inputs.get("text_logits") is None:
            raise ValueError("the i2t term needs text_logits (built with_text=True, called without them)")
        return self.cross_entropy(inputs["text_logits"], labels)


@dataclass(frozen=True)
class LossTerm:
    build: Callable[[LossConfig, int, list[int]], nn.Module]  # (config, classes, feature dims) → term
    needs_text: bool = False  # runs only on a model with learned identity texts


def _center(cfg: LossConfig, num_classes: int, dims: list[int]) -> nn.Module:
    # The center optimizer then sees the gradient of each branch's unweighted center loss (BoT
    # divides by the weight), undoing a branch average too; see ReIDLoss.center_parameters().
    scale = (1 if cfg.branch_reduction == "sum" else len(dims)) / cfg.center
    return OverBranches("metric", cfg.branch_reduction, branches=[CenterLoss(num_classes, d, scale) for d in dims])


LOSS_TERMS: dict[str, LossTerm] = {
    "ce": LossTerm(lambda cfg, n, dims: OverBranches(
        "logits", cfg.branch_reduction, shared=SmoothedCrossEntropy(cfg.label_smoothing))),
    "triplet": LossTerm(lambda cfg, n, dims: OverBranches(
        "metric", cfg.branch_reduction, shared=BatchHardTriplet(cfg.triplet_margin, cfg.triplet_soft))),
    "center": LossTerm(_center),
    "supcon": LossTerm(lambda cfg, n, dims: OverBranches(
        "metric", cfg.branch_reduction, shared=SupConLoss(temperature=cfg.supcon_temperature))),
    "arcface": LossTerm(lambda cfg, n, dims: OverBranches("metric", cfg.branch_reduction, branches=[
        ArcFaceLoss(n, d, margin=cfg.arcface_margin, scale=cfg.arcface_scale) for d in dims])),
    "i2t": LossTerm(lambda cfg, n, dims: TextCrossEntropy(cfg.label_smoothing), needs_text=True),
}
