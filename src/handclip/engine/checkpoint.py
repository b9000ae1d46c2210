"""Checkpoints: weights, the resolved config and the class map in one file, so evaluation
needs nothing else. Loading never executes pickled code (``torch.load(weights_only=True)``)."""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import torch

from handclip.config import Config, config_from_dict, config_to_dict
from handclip.errors import UserError
from handclip.fileio import atomic_write_bytes, check_format

CHECKPOINT_FORMAT = "handclip-checkpoint"
CHECKPOINT_VERSION = 1
# The text tower (kept only for CLIP-ReID prompts) is frozen: it is rebuilt from its pretrained
# weights, never stored (~63M parameters for ViT-B/16).
FROZEN_TEXT_PREFIX = "backbone.text."


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, config: Config, class_names: list[str],
                    epoch: int, metrics: dict | None = None, training_state: dict | None = None,
                    trained_subjects: dict[str, list[str]] | None = None) -> None:
    """Write a checkpoint atomically. ``training_state`` (optimiser, scheduler, ...) makes it resumable.

    It records the backbone's architecture choices (QuickGELU, input size, preprocessing), so a
    rebuild without the pretrained weights is the same model, and ``trained_subjects`` (dataset →
    subject ids of every stage it descends from), which ``evaluate`` checks against its test subjects."""
    model = _unwrap(model)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": config_to_dict(config),
        "architecture": model.backbone.architecture(),
        "trained_subjects": trained_subjects,
        "class_names": list(class_names),
        "epoch": int(epoch),
        "metrics": dict(metrics or {}),
        "model": {k: v for k, v in model.state_dict().items() if not k.startswith(FROZEN_TEXT_PREFIX)},
    }
    if training_state is not None:
        payload["training_state"] = training_state
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read and check a checkpoint; any failure is one ``UserError`` line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 — any parse failure means "not a checkpoint", said in one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            reason = "it holds pickled code, which handclip never executes"
        raise UserError(f"{path}: not a handclip checkpoint ({reason[:200]})") from None
    check_format(payload, path, "checkpoint", CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    return payload


def checkpoint_config(payload: dict) -> Config:
    return config_from_dict(payload["config"])


def build_model_from_checkpoint(payload: dict, path: str | Path, keep_text: bool = False):
    """Rebuild the model a checkpoint was saved from and load its weights (the checkpoint holds
    them all, so the architecture is built without pretrained weights: nothing is downloaded),
    with the architecture choices its pretrained weights had made (QuickGELU, preprocessing)."""
    from handclip.models.reid import build_reid_model

    config = checkpoint_config(payload)
    architecture = checkpoint_architecture(payload)
    model_cfg = dataclasses.replace(config.model, pretrained="none", quick_gelu=architecture["quick_gelu"],
                                    image_size=architecture.get("image_size", config.model.image_size))
    model = build_reid_model(model_cfg, num_classes=len(payload["class_names"]), keep_text=keep_text,
                             preprocess=architecture["preprocess"])
    load_weights(model, payload["model"], path)
    return model.eval(), config  # a loaded model is for inference


def checkpoint_architecture(payload: dict) -> dict:
    """The checkpoint's architecture record; for one of an older handclip, what its config's
    ``model.pretrained`` implied (a tag's QuickGELU and statistics; an archive still on disk)."""
    if payload.get("architecture"):
        return payload["architecture"]
    from handclip.models.backbones import implied_architecture

    model = payload["config"]["model"]
    return implied_architecture(model["arch"], model["pretrained"], model.get("quick_gelu", "auto"))


def load_weights(model: torch.nn.Module, state_dict: dict, path: str | Path, strict: bool = True) -> None:
    """Load ``state_dict``; a shape or key mismatch is one line naming the file and the first key."""
    own = model.state_dict()
    for key, tensor in state_dict.items():
        if key in own and own[key].shape != tensor.shape:
            raise UserError(f"{path}: weights do not fit this architecture ('{key}' is "
                            f"{tuple(tensor.shape)}, the model has {tuple(own[key].shape)})")
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.startswith(FROZEN_TEXT_PREFIX)]
    if strict and (missing or unexpected):
        key = (missing or unexpected)[0]
        what = "misses" if missing else "has an unknown key"
        raise UserError(f"{path}: weights do not fit this architecture (the checkpoint {what} '{key}')")


def load_model(path: str | Path, device: str = "cpu"):
    """A ready :class:`~handclip.engine.encoder.Encoder` from a checkpoint; its ``trained_subjects``
    is the checkpoint's record (None for a checkpoint of an older handclip, which has none)."""
    from handclip.engine.encoder import Encoder

    payload = load_checkpoint(path)
    model, _ = build_model_from_checkpoint(payload, path)
    return Encoder(model, device=device, trained_subjects=payload.get("trained_subjects"))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
