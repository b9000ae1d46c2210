"""The training objective: any weighted combination of the re-ID loss terms.

Terms (``LossConfig`` weights; a weight of 0 leaves the term out entirely):

- ``ce``: identity cross-entropy with label smoothing on every branch's logits.
- ``triplet``: batch-hard triplet (pytorch-metric-learning's ``BatchHardMiner`` +
  ``TripletMarginLoss``, recomputed with masks so that the step never waits for the GPU) on the
  Euclidean distance of the *un-normalised* metric features, as Bag of Tricks and CLIP-ReID do, averaged over all anchors (BoT's ``MarginRankingLoss``
  mean; PML's default would average only the non-zero triplets). ``triplet_soft`` uses
  ``softplus(d_ap - d_an)`` = ``log(1 + exp(d_ap - d_an))`` (BoT's soft margin) instead of
  ``relu(d_ap - d_an + margin)``.
- ``center``: center loss (``handclip.losses.center``), one set of centers per branch.
- ``supcon``: PML ``SupConLoss`` (cosine similarity, ``supcon_temperature``).
- ``arcface``: PML ``ArcFaceLoss`` on the metric features, one per branch; its class weights
  are ordinary parameters of this module (they train with the head learning rate).
- ``i2t``: CLIP-ReID stage 2, cross-entropy (with the same label smoothing) of the
  image-to-text logits against the labels; a model without learned identity texts
  (``with_text=False``) cannot have it: an error when the loss is built.

Each term is a module of ``handclip.losses.terms`` and an entry of its ``LOSS_TERMS`` table.

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

import re
from collections.abc import Iterator

import torch
from torch import nn

from handclip.config import LossConfig
from handclip.errors import UserError
from handclip.losses.terms import LOSS_TERMS

# Keys of a last.pt written before the terms were modules: center.<i>.centers, arcface.<i>.W.
_OLDER_KEY = re.compile(r"^(center|arcface)\.(\d+)\.")


class ReIDLoss(nn.Module):
    """``forward(outputs, labels, text_logits=None) -> (total, {term: detached scalar})``: the
    weighted sum of the terms whose ``LossConfig`` weight is above 0 (as pytorch-metric-learning's
    ``MultipleLosses``).

    ``outputs`` is the model's dict: ``outputs["logits"]`` a list of per-branch (B, C) logits,
    ``outputs["metric"]`` a list of per-branch (B, D_i) features with D_i = ``feature_dims[i]``.
    ``with_text``: the model has learned identity texts (``text_logits`` come with every call).
    """

    def __init__(self, loss_cfg: LossConfig, num_classes: int, feature_dims: list[int], with_text: bool = False):
        super().__init__()
        self.weights = {name: getattr(loss_cfg, name) for name in LOSS_TERMS if getattr(loss_cfg, name) > 0}
        if not self.weights:
            raise UserError("config section 'loss': every term weight is 0; turn one on, e.g. loss.ce=1.0")
        for name in self.weights:
            if LOSS_TERMS[name].needs_text and not with_text:
                raise UserError(f"config key 'loss.{name}': needs the learned identity texts of prompt learning "
                                f"(CLIP-ReID stage 1), which this model has not")
        self.terms = nn.ModuleDict({name: LOSS_TERMS[name].build(loss_cfg, num_classes, feature_dims)
                                    for name in self.weights})
        self._register_load_state_dict_pre_hook(_rename_older_keys)

    def forward(self, outputs: dict, labels: torch.Tensor, text_logits: torch.Tensor | None = None):
        # float32, autocast off: the metric losses and PML's ArcFace (which casts its weights to the
        # features' dtype) must not run in bf16.
        with torch.autocast(labels.device.type, enabled=False):
            inputs = {**outputs, "text_logits": text_logits}
            terms = {name: term(inputs, labels) for name, term in self.terms.items()}
            total = sum(self.weights[name] * value for name, value in terms.items())
        return total, {name: value.detach() for name, value in terms.items()}

    def center_parameters(self) -> Iterator[nn.Parameter]:
        """The class centers, for their own optimizer: plain SGD at ``loss.center_lr`` (BoT: 0.5).

        Their gradients are already divided by the center weight (times the number of branches,
        undoing a branch average), so that step size does not depend on ``loss.center``.
        """
        if "center" in self.terms:
            yield from (loss.centers for loss in self.terms["center"].branches)

    def non_center_parameters(self) -> Iterator[nn.Parameter]:
        """Every other parameter (ArcFace class weights): the head learning rate applies."""
        centers = {id(p) for p in self.center_parameters()}
        yield from (p for p in self.parameters() if id(p) not in centers)


def _rename_older_keys(state_dict: dict, prefix: str, *_) -> None:
    """Resume a run whose last.pt predates the term modules (its loss keys had no ``terms.``)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        older = _OLDER_KEY.match(key[len(prefix):])
        if older:
            rest = key[len(prefix) + older.end():]
            state_dict[f"{prefix}terms.{older[1]}.branches.{older[2]}.{rest}"] = state_dict.pop(key)
