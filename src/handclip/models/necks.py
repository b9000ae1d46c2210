"""BNNeck (Luo et al., "Bag of Tricks and a Strong Baseline for Deep Person Re-ID", 2019)."""
from __future__ import annotations

from torch import nn


class BNNeck(nn.BatchNorm1d):
    """BatchNorm between the feature and the classifier. Its shift stays at zero (frozen), as in
    the paper, so the normalised feature keeps its direction around the origin."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.bias.requires_grad_(False)


# model.neck → (dim) → neck; the config's Literal lists these keys.
NECKS = {"none": lambda dim: nn.Identity(), "bnneck": BNNeck}
