"""The evaluation protocols handclip names, and published hand re-ID results, each with the
protocol and the AP definition it was measured under.

A published number is comparable with a handclip result only when both rank the same galleries
the same way and read AP the same way: MBA-Net and GPA-Net used the ``published`` protocol and the
trapezoid AP (handclip's ``mAP_trapezoid``); the CLIP-FH thesis and the zero-shot CLIP rows used the
single-aspect gallery and the standard AP (``mAP``). Values are fractions, as in results.json.
Source of the numbers: the project's domain brief, "Published results to beat".
"""
from __future__ import annotations

from dataclasses import dataclass

from handclip.hand_datasets import ASPECTS_11K


@dataclass(frozen=True)
class EvaluationProtocol:
    """What ``handclip evaluate --protocol NAME`` ranks: the aspects whose queries meet their
    ``gallery_<i>_all`` (the others their ``gallery_<i>``), whether each feature adds its flipped
    image's, and whether ``--query-aspect/--gallery-aspect`` may replace the galleries."""

    description: str
    gallery_all_aspects: frozenset[str]
    flip: bool
    cross_aspect: bool


PROTOCOLS = {
    "single-aspect": EvaluationProtocol(
        description="each aspect's queries against its own gallery_<i> (HD: with its distractors)",
        gallery_all_aspects=frozenset(), flip=False, cross_aspect=True),
    # nathanlem1/MBA-Net eval_query_gallery.py and nathanlem1/CLIP-HandID eval_query_gallery_finetune.py
    "published": EvaluationProtocol(
        description="11k: each aspect's queries against gallery_<i>_all (the four aspects' galleries pooled, "
                    "other aspects as other identities); HD: gallery_<i> with the 213 distractor subjects; "
                    "features of each image and its horizontal flip summed",
        gallery_all_aspects=frozenset(ASPECTS_11K), flip=True, cross_aspect=False),
}
# Which results.json metric holds each AP definition.
AP_METRIC = {"trapezoid": "mAP_trapezoid", "standard": "mAP"}


@dataclass(frozen=True)
class PublishedResult:
    method: str
    backbone: str
    dataset: str      # "11k" or "hd"
    aspect: str       # the evaluated aspect key
    protocol: str     # a key of PROTOCOLS
    ap: str           # a key of AP_METRIC
    rank1: float
    mAP: float        # under the row's own AP definition
    source: str
    trained_on: str   # the aspect the model was trained on (differs from `aspect` only cross-dataset)

    @property
    def map_metric(self) -> str:
        """The results.json key this row's mAP is comparable with."""
        return AP_METRIC[self.ap]


_MBA = ("MBA-Net", "ResNet50 (ImageNet), 324 px",
        "Baisa et al., Multi-Branch with Attention Network for Hand-Based Person Recognition, ICPR 2022 "
        "(nathanlem1/MBA-Net)")
_GPA = ("GPA-Net", "ResNet50 with part branches", "Baisa et al., GPA-Net (global and part-aware), 2021")
_THESIS = "CLIP-FH MSc thesis (2025)"


def _row(method_backbone_source, aspect, protocol, ap, rank1, mAP, trained_on=None) -> PublishedResult:
    method, backbone, source = method_backbone_source
    return PublishedResult(method=method, backbone=backbone, dataset="hd" if aspect == "hd" else "11k",
                           aspect=aspect, protocol=protocol, ap=ap, rank1=rank1, mAP=mAP, source=source,
                           trained_on=trained_on or aspect)


PUBLISHED_RESULTS: tuple[PublishedResult, ...] = (
    *(_row(_MBA, aspect, "published", "trapezoid", r1, m) for aspect, r1, m in (
        ("dorsal_r", 0.9745, 0.9798), ("dorsal_l", 0.9671, 0.9741), ("palmar_r", 0.9805, 0.9842),
        ("palmar_l", 0.9742, 0.9784), ("hd", 0.9512, 0.9554))),
    *(_row(_GPA, aspect, "published", "trapezoid", r1, m) for aspect, r1, m in (
        ("dorsal_r", 0.9480, 0.9572), ("dorsal_l", 0.9487, 0.9593), ("palmar_r", 0.9583, 0.9631),
        ("palmar_l", 0.9572, 0.9620), ("hd", 0.9464, 0.9508))),
    _row(("MBA-Net, trained on 11k dorsal_r (cross-dataset)",) + _MBA[1:], "hd", "published", "trapezoid",
         0.8441, 0.8598, trained_on="dorsal_r"),
    _row(("CLIP-FH: CLIP fine-tuned with CE+triplet+center+ArcFace+SupCon", "CLIP ViT-B/16", _THESIS),
         "dorsal_r", "single-aspect", "standard", 0.8818, 0.9220),
    _row(("CLIP zero-shot", "CLIP ViT-B/16", f"{_THESIS}, zero-shot baseline"),
         "dorsal_r", "single-aspect", "standard", 0.7142, 0.7898),
    _row(("CLIP zero-shot", "CLIP RN50", f"{_THESIS}, zero-shot baseline"),
         "dorsal_r", "single-aspect", "standard", 0.6861, 0.7578),
)


def protocol_base(label: str) -> str:
    """The protocol a results.json label names: its first part. Modifiers after '+' (rerank,
    fusion, flip) change the method, not which galleries are ranked."""
    return label.split("+", 1)[0]


def for_aspect(aspect: str) -> list[PublishedResult]:
    """Every published row evaluated on ``aspect``, whatever its protocol."""
    return [row for row in PUBLISHED_RESULTS if row.aspect == aspect]


def comparable(aspect: str, protocol: str) -> list[PublishedResult]:
    """The published rows a result on ``aspect`` under the protocol label ``protocol`` may stand beside."""
    return [row for row in for_aspect(aspect) if row.protocol == protocol_base(protocol)]
