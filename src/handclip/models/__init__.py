"""CLIP backbones (open_clip), freezing, necks, classifiers, heads and the re-ID model."""
from handclip.models.backbones import Backbone, create_backbone
from handclip.models.freezing import apply_freezing
from handclip.models.reid import ReIDModel, build_reid_model

__all__ = ["Backbone", "ReIDModel", "apply_freezing", "build_reid_model", "create_backbone"]
