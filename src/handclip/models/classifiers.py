"""Identity classifiers on a branch feature: linear (BoT style, no bias), cosine, and the margin
classifiers ArcFace (additive angular margin) and CosFace (additive cosine margin).

Every classifier is called as ``classifier(features, labels=None)``; margins apply only in
training mode and only when labels are given, so evaluation logits are plain scaled cosines.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn



class LinearClassifier(nn.Linear):
    def __init__(self, dim: int, num_classes: int):
        super().__init__(dim, num_classes, bias=False)
        nn.init.normal_(self.weight, std=0.001)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(features)


class CosineClassifier(nn.Module):
    """``scale`` × cosine between the feature and each class weight."""

    def __init__(self, dim: int, num_classes: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * 0.01)
        self.scale = scale

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        # float32 even under autocast: bf16 keeps ~3 digits, too coarse for cosines near 1 and margins.
        with torch.autocast(features.device.type, enabled=False):
            cosine = F.linear(F.normalize(features.float()), F.normalize(self.weight.float()))
            if labels is not None and self.training:
                target = cosine.gather(1, labels[:, None])
                cosine = cosine.scatter(1, labels[:, None], self.target_logit(target))
            return self.scale * cosine

    def target_logit(self, cosine: torch.Tensor) -> torch.Tensor:
        return cosine


class CosFaceClassifier(CosineClassifier):
    """CosFace (Wang et al., 2018): the true class's cosine minus ``margin``."""

    def __init__(self, dim: int, num_classes: int, scale: float, margin: float):
        super().__init__(dim, num_classes, scale)
        self.margin = margin

    def target_logit(self, cosine: torch.Tensor) -> torch.Tensor:
        return cosine - self.margin


class ArcFaceClassifier(CosineClassifier):
    """ArcFace (Deng et al., 2019): cos(θ + ``margin``) for the true class (margin in radians)."""

    def __init__(self, dim: int, num_classes: int, scale: float, margin: float):
        super().__init__(dim, num_classes, scale)
        self.margin = margin

    def target_logit(self, cosine: torch.Tensor) -> torch.Tensor:
        theta = torch.acos(cosine.clamp(-1 + 1e-6, 1 - 1e-6))
        # Past θ = π - m, cos(θ + m) would rise again; there the paper's code falls back to a
        # linear penalty that keeps the logit decreasing in θ.
        fallback = cosine - self.margin * math.sin(math.pi - self.margin)
        return torch.where(theta + self.margin < math.pi, torch.cos(theta + self.margin), fallback)


# model.classifier → (dim, classes, scale, margin) → classifier; the config's Literal lists these keys.
CLASSIFIERS = {
    "linear": lambda dim, num_classes, scale, margin: LinearClassifier(dim, num_classes),
    "cosine": lambda dim, num_classes, scale, margin: CosineClassifier(dim, num_classes, scale),
    "arcface": ArcFaceClassifier,
    "cosface": CosFaceClassifier,
}


def make_classifier(kind: str, dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.3) -> nn.Module:
    return CLASSIFIERS[kind](dim, num_classes, scale, margin)
