"""The re-ID model: CLIP backbone → head (one or more branches) → per-branch neck and classifier.

``forward(images, labels=None)`` returns

- ``metric``: per-branch features for the metric losses (before or after the neck, per config),
  then, with ``penultimate_metric``, the backbone's ``penultimate`` feature (no neck),
- ``logits``: per-branch classifier logits ([] when ``num_classes`` is 0),
- ``embedding``: the test feature, all branches concatenated (before or after the neck; not
  normalised). With head global, neck none and embedding proj it is exactly the CLIP image
  embedding (zero-shot evaluation),
- ``global``: the CLIP image embedding (``proj``), for CLIP-ReID's image-to-text loss.
"""
from __future__ import annotations

import torch
from torch import nn

from handclip.config import ModelConfig, OptimConfig
from handclip.models.backbones import Backbone, create_backbone
from handclip.models.classifiers import make_classifier
from handclip.models.freezing import apply_freezing
from handclip.models.heads import make_head
from handclip.models.necks import NECKS


class ReIDModel(nn.Module):
    def __init__(self, backbone: Backbone, head: nn.Module, necks: list[nn.Module], classifiers: list[nn.Module],
                 metric_feature: str = "before_bn", test_feature: str = "after_bn", layer_decay: float = 1.0,
                 penultimate_metric: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.necks = nn.ModuleList(necks)
        self.classifiers = nn.ModuleList(classifiers)
        self.metric_feature = metric_feature
        self.test_feature = test_feature
        self.layer_decay = layer_decay
        self.penultimate_metric = penultimate_metric
        # what the metric losses see, one entry per feature of outputs["metric"]
        self.feature_dims = list(head.dims) + ([backbone.dims["penultimate"]] if penultimate_metric else [])
        self.embedding_dim = sum(head.dims)
        self.num_classes = classifiers[0].weight.shape[0] if classifiers else 0
        self.image_size, self.mean, self.std = backbone.image_size, backbone.mean, backbone.std

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        features = self.backbone(images)
        before = self.head(features)
        after = [neck(feature) for neck, feature in zip(self.necks, before)]
        metric = before if self.metric_feature == "before_bn" else after
        if self.penultimate_metric:
            metric = [*metric, features["penultimate"]]
        test = before if self.test_feature == "before_bn" else after
        logits = [classifier(feature, labels) for classifier, feature in zip(self.classifiers, after)]
        return {"metric": metric, "logits": logits, "embedding": torch.cat(test, dim=1), "global": features["proj"]}

    def param_groups(self, optim_cfg: OptimConfig) -> list[dict]:
        """Optimiser groups of the trainable parameters: backbone groups from the top down with
        lr × layer_decay^depth (the final group has depth 0), new layers with lr × head_lr_mult.
        With ``bias_lr_mult`` ≠ 1 or a ``bias_weight_decay``, each group's biases (every parameter
        named ``*bias*``, as CLIP-ReID selects them) form a group ``<name>.bias`` of their own."""
        groups = self.backbone.layer_groups()
        names = ["stem", *(f"block{i}" for i in range(1, len(groups) - 1)), "final"]
        result = []
        for depth, (name, group) in enumerate(zip(reversed(names), reversed(groups))):
            result.append({"name": f"backbone.{name}", "params": _trainable(group),
                           "lr": optim_cfg.lr * self.layer_decay ** depth, "weight_decay": optim_cfg.weight_decay})
        result.append({"name": "head", "params": _trainable([self.head, self.necks, self.classifiers]),
                       "lr": optim_cfg.lr * optim_cfg.head_lr_mult, "weight_decay": optim_cfg.weight_decay})
        if optim_cfg.bias_lr_mult != 1.0 or optim_cfg.bias_weight_decay is not None:
            result = [part for group in result for part in self._split_biases(group, optim_cfg)]
        return [group for group in result if group["params"]]

    def _split_biases(self, group: dict, optim_cfg: OptimConfig) -> list[dict]:
        biases = {id(p) for name, p in self.named_parameters() if "bias" in name}
        decay = optim_cfg.weight_decay if optim_cfg.bias_weight_decay is None else optim_cfg.bias_weight_decay
        return [dict(group, params=[p for p in group["params"] if id(p) not in biases]),
                dict(group, name=f"{group['name']}.bias", params=[p for p in group["params"] if id(p) in biases],
                     lr=group["lr"] * optim_cfg.bias_lr_mult, weight_decay=decay)]


def _trainable(modules: list[nn.Module]) -> list[nn.Parameter]:
    return [p for module in modules for p in module.parameters() if p.requires_grad]


def build_reid_model(model_cfg: ModelConfig, num_classes: int, keep_text: bool = False,
                     preprocess: dict | None = None) -> ReIDModel:
    """The model ``model_cfg`` describes, with its freezing applied; ``num_classes`` 0: no classifiers.
    ``preprocess``: mean/std overriding the weights' own (a checkpoint's record)."""
    backbone = create_backbone(model_cfg.arch, model_cfg.pretrained, model_cfg.image_size, keep_text,
                               model_cfg.quick_gelu, preprocess, model_cfg.last_stride, model_cfg.pixel_stats)
    apply_freezing(backbone, model_cfg.unfreeze, model_cfg.bn_policy)
    head = make_head(model_cfg.head, backbone, model_cfg.embedding, model_cfg.parts, model_cfg.part_direction)
    necks = [NECKS[model_cfg.neck](dim) for dim in head.dims]
    classifiers = [make_classifier(model_cfg.classifier, dim, num_classes, model_cfg.classifier_scale,
                                   model_cfg.classifier_margin) for dim in head.dims] if num_classes > 0 else []
    return ReIDModel(backbone, head, necks, classifiers, model_cfg.metric_feature, model_cfg.test_feature,
                     model_cfg.layer_decay, model_cfg.penultimate_metric)
