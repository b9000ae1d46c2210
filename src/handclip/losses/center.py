"""Center loss (Wen et al., ECCV 2016), as Bag of Tricks for re-ID uses it.

pytorch-metric-learning has no center loss, so it is written here.
"""
from __future__ import annotations

import torch
from torch import nn


class CenterLoss(nn.Module):
    """Mean squared Euclidean distance of each feature to its class center.

    BoT's form: ``mean_i ||x_i - c_{y_i}||^2`` (Wen et al. put a factor 1/2 in front; BoT and
    its weight 0.0005 do not). Centers start from a standard normal, as in BoT, and are a
    parameter meant for their own optimizer (see ``ReIDLoss.center_parameters``).

    ``center_grad_scale`` multiplies the gradient that reaches the centers (not the one that
    reaches the features): BoT divides the center gradients by the loss weight so that the
    centers move at their own learning rate whatever the weight.
    """

    def __init__(self, num_classes: int, dim: int, center_grad_scale: float = 1.0):
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, dim))
        self.center_grad_scale = center_grad_scale

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        centers = self.centers[labels]
        if centers.requires_grad and self.center_grad_scale != 1.0:
            centers.register_hook(lambda grad: grad * self.center_grad_scale)
        squared = (features - centers).pow(2).sum(dim=1)
        return squared.clamp(min=1e-12, max=1e12).mean()
