"""The training objective: any weighted combination of the re-ID loss terms.

Terms (``LossConfig`` weights; a weight of 0 leaves the term out entirely):

- ``ce``: identity cross-entropy with label smoothing on every branch's logits.
- ``triplet``: batch-hard triplet (pytorch-metric-learning ``BatchHardMiner`` +
  ``TripletMarginLoss``) on the Euclidean distance of the *un-normalised* metric features, as
  Bag of Tricks and CLIP-ReID do, averaged over all anchors (BoT's ``MarginRankingLoss``
  mean; PML's default would average only the non-zero triplets). ``triplet_soft`` uses
  ``softplus(d_ap - d_an)`` = ``log(1 + exp(d_ap - d_an))`` (BoT's soft margin) instead of
  ``relu(d_ap - d_an + margin)``.
- ``center``: center loss (``handclip.losses.center``), one set of centers per branch.
- ``supcon``: PML ``SupConLoss`` (cosine similarity, ``supcon_temperature``).
- ``arcface``: PML ``ArcFaceLoss`` on the metric features, one per branch; its class weights
  are ordinary parameters of this module (they train with the head learning rate).
- ``i2t``: CLIP-ReID stage 2, cross-entropy (with the same label smoothing) of the
  image-to-text logits against the labels; computed only when ``text_logits`` is given.

Per-branch terms are averaged over the branches (``loss.branch_reduction: mean``), so a weight
means the same for a one-branch and a multi-branch head, or summed (``sum``: BoT, CLIP-HandID and
CLIP-ReID add their branches' losses). Everything is computed in float32
with autocast off: the metric losses and PML's ArcFace (which casts its weights to the
features' dtype) must not run in bf16.

Triplet and SupCon need positive pairs: train them with ``data.sampler: pk``. A batch without
any positive pair does not fail — those terms are then 0 (with a graph, so backward works) —
but it teaches nothing.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import ArcFaceLoss, SupConLoss, TripletMarginLoss
from pytorch_metric_learning.miners import BatchHardMiner
from pytorch_metric_learning.reducers import MeanReducer
from torch import nn

from handclip.config import LossConfig
from handclip.errors import UserError
from handclip.losses.center import CenterLoss

TERMS = ("ce", "triplet", "center", "supcon", "arcface", "i2t")


class ReIDLoss(nn.Module):
    """``forward(outputs, labels, text_logits=None) -> (total, {term: detached scalar})``.

    ``outputs`` is the model's dict: ``outputs["logits"]`` a list of per-branch (B, C) logits,
    ``outputs["metric"]`` a list of per-branch (B, D_i) features with D_i = ``feature_dims[i]``.
    ``total`` is the sum of weight × term over the terms that are on.
    """

    def __init__(self, loss_cfg: LossConfig, num_classes: int, feature_dims: list[int]):
        super().__init__()
        self.weights = {name: getattr(loss_cfg, name) for name in TERMS if getattr(loss_cfg, name) > 0}
        if not self.weights:
            raise UserError("config section 'loss': every term weight is 0; turn one on, e.g. loss.ce=1.0")
        self.label_smoothing = loss_cfg.label_smoothing
        if loss_cfg.branch_reduction not in ("mean", "sum"):
            raise UserError(f"config key 'loss.branch_reduction': {loss_cfg.branch_reduction!r} is not mean or sum")
        self.branch_sum = loss_cfg.branch_reduction == "sum"
        if "triplet" in self.weights:
            self.miner = BatchHardMiner(distance=LpDistance(normalize_embeddings=False))
            self.triplet = TripletMarginLoss(
                margin=0.0 if loss_cfg.triplet_soft else loss_cfg.triplet_margin,
                smooth_loss=loss_cfg.triplet_soft,
                distance=LpDistance(normalize_embeddings=False),
                reducer=MeanReducer(),
            )
        if "center" in self.weights:
            # The center optimizer then sees the gradient of each branch's unweighted center
            # loss (BoT divides by the weight); see center_parameters().
            scale = (1 if self.branch_sum else len(feature_dims)) / self.weights["center"]
            self.center = nn.ModuleList(CenterLoss(num_classes, dim, scale) for dim in feature_dims)
        if "supcon" in self.weights:
            self.supcon = SupConLoss(temperature=loss_cfg.supcon_temperature)
        if "arcface" in self.weights:
            self.arcface = nn.ModuleList(
                ArcFaceLoss(num_classes, dim, margin=loss_cfg.arcface_margin, scale=loss_cfg.arcface_scale)
                for dim in feature_dims
            )

    def forward(self, outputs: dict, labels: torch.Tensor, text_logits: torch.Tensor | None = None):
        with torch.autocast(labels.device.type, enabled=False):
            features = [f.float() for f in outputs.get("metric", [])]
            terms = {}
            for name in self.weights:
                if name == "ce":
                    terms[name] = self._branches(self._cross_entropy(logits, labels) for logits in outputs["logits"])
                elif name == "triplet":
                    terms[name] = self._branches(self.triplet(f, labels, self.miner(f, labels)) for f in features)
                elif name == "center":
                    terms[name] = self._branches(loss(f, labels) for loss, f in zip(self.center, features))
                elif name == "supcon":
                    terms[name] = self._branches(self.supcon(f, labels) for f in features)
                elif name == "arcface":
                    terms[name] = self._branches(loss(f, labels) for loss, f in zip(self.arcface, features))
                elif name == "i2t" and text_logits is not None:
                    terms[name] = self._cross_entropy(text_logits, labels)
            total = sum(self.weights[name] * value for name, value in terms.items())
        return total, {name: value.detach() for name, value in terms.items()}

    def _branches(self, values: Iterable[torch.Tensor]) -> torch.Tensor:
        """A per-branch term combined over the branches: their mean, or their sum."""
        stacked = torch.stack(list(values))
        return stacked.sum() if self.branch_sum else stacked.mean()

    def _cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def center_parameters(self) -> Iterator[nn.Parameter]:
        """The class centers, for their own optimizer: plain SGD at ``loss.center_lr`` (BoT: 0.5).

        Their gradients are already divided by the center weight (times the number of branches,
        undoing a branch average), so that step size does not depend on ``loss.center``.
        """
        if "center" in self.weights:
            yield from (loss.centers for loss in self.center)

    def non_center_parameters(self) -> Iterator[nn.Parameter]:
        """Every other parameter (ArcFace class weights): the head learning rate applies."""
        centers = {id(p) for p in self.center_parameters()}
        yield from (p for p in self.parameters() if id(p) not in centers)

