"""``handclip.load_model``: one entry point for a fine-tuned checkpoint or a zero-shot CLIP."""
from __future__ import annotations

import os
from pathlib import Path

from handclip.engine.encoder import Encoder
from handclip.errors import UserError

ZERO_SHOT_DEFAULT_WEIGHTS = "openai"  # as `handclip evaluate --zero-shot`


def load_model(path_or_arch: str | os.PathLike, pretrained: str | None = None, device: str = "cpu",
               quick_gelu: bool | str = "auto") -> Encoder:
    """An :class:`Encoder` whose ``encode(paths_or_images)`` gives L2-normalised features.

    ``path_or_arch`` a checkpoint file: the fine-tuned model it holds, built exactly as it trained.
    An architecture name (open_clip's, or tiny-vit / tiny-rn): the zero-shot CLIP image encoder with
    weights ``pretrained`` (an open_clip tag, a weights file or "none"; default "openai") and
    ``quick_gelu`` (see ``model.quick_gelu``).
    """
    from handclip.engine.checkpoint import load_model as load_checkpoint_model
    from handclip.engine.evaluation import zero_shot_model
    from handclip.models.backbones import is_known_arch

    path = Path(path_or_arch).expanduser()
    if path.is_file():
        if pretrained is not None:
            raise UserError(f"{path}: a checkpoint holds its own weights; pretrained= goes with an architecture name")
        return load_checkpoint_model(path, device=device)
    name = str(path_or_arch)
    if is_known_arch(name):
        weights = ZERO_SHOT_DEFAULT_WEIGHTS if pretrained is None else pretrained
        return Encoder(zero_shot_model(name, weights, quick_gelu=quick_gelu), device=device, trained_subjects={})
    raise UserError(f"{name}: neither a checkpoint file nor a known architecture "
                    f"(an open_clip model name such as ViT-B-16, or tiny-vit / tiny-rn)")
