"""What trains in the backbone: all of it, none of it, or its last N blocks / stages.

``unfreeze`` N trains the last N transformer blocks (ViT) or residual stages (RN) plus the final
group (``ln_post`` and ``proj`` / the attention pool); 0 trains the final group only. Frozen
parameters get ``requires_grad=False`` (so the optimiser never sees them) and the BatchNorm
layers among them stay in eval mode, so frozen layers stay bit-identical, statistics included.
``bn_policy="frozen"`` does the same to every BatchNorm of the backbone (RN50: keep the loaded
statistics and affine weights even in the layers that train).
"""
from __future__ import annotations

from torch import nn

from handclip.errors import UserError
from handclip.models.backbones import Backbone


def apply_freezing(backbone: Backbone, unfreeze: int | str, bn_policy: str = "train") -> None:
    groups = backbone.layer_groups()
    blocks = len(groups) - 2  # without the stem and the final group
    if unfreeze == "all":
        trainable = groups
    elif unfreeze == "none":
        trainable = []
    elif isinstance(unfreeze, int) and not isinstance(unfreeze, bool) and 0 <= unfreeze <= blocks:
        trainable = groups[len(groups) - 1 - unfreeze:]
    else:
        unit = "transformer blocks" if backbone.kind == "vit" else "residual stages"
        raise UserError(f"config key 'model.unfreeze': {unfreeze!r} is not 'all', 'none' or 0..{blocks} "
                        f"({backbone.arch} has {blocks} {unit})")
    backbone.visual.requires_grad_(False)
    for group in trainable:
        for module in group:
            module.requires_grad_(True)
    if bn_policy == "frozen":
        for module in backbone.visual.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.requires_grad_(False)
    backbone.bn_policy = bn_policy
    backbone.train(backbone.training)  # put the frozen BatchNorm layers in eval mode now
