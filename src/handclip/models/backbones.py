"""CLIP image encoders from open_clip, with their weights, as re-ID backbones.

``create_backbone`` builds any open_clip architecture, or the tiny presets ``tiny-vit`` /
``tiny-rn`` / ``tiny-rn-96`` (JSON configs in ``model_configs/``; ``tiny-rn-96`` is the demo's
pretrained backbone, handclip.weights), and loads weights from an
open_clip tag, a local file, or none. Loading never unpickles Python objects: state dicts go
through ``torch.load(weights_only=True)``, ``.safetensors`` files through safetensors, and OpenAI's
original TorchScript ``.pt`` archives through ``torch.jit.load`` (it rebuilds TorchScript code and
tensors, not Python pickles); only their tensors are kept.

``Backbone.forward(images)`` returns four features:

- ``proj``: the CLIP image embedding, exactly ``CLIP.encode_image`` (E dims).
- ``pre_proj``: the feature the projection takes. ViT: the class token after ``ln_post``
  (width W). RN: the global average of the last stage's map (C dims); the attention pool has
  no separate pre-projection output.
- ``map``: ViT: the patch tokens after ``ln_post`` on their 2-D grid, not projected (W channels);
  RN: the last stage's feature map (C channels).
- ``penultimate``: ViT: the class token after the penultimate block, before any norm (W); RN: the
  global average of the penultimate stage's map (C / 2). CLIP-ReID's ``img_feature_last``.

``last_stride=1`` (RN only) removes the downsampling of the last residual stage, as CLIP-HandID
and CLIP-ReID build RN50: the map doubles to 14 × 14 at 224 px, and the attention pool's
positional grid is interpolated to it. ``pixel_stats`` overrides the input normalisation.

``image_size`` changes the input size. With weights, the positional embeddings are interpolated
to it (ViT by open_clip, the RN attention pool here).
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import pickle
import socket
import sys
import warnings
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, IMAGENET_MEAN, IMAGENET_STD,
                                  OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed
from open_clip.modified_resnet import ModifiedResNet
from open_clip.factory import get_model_config
from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model
from open_clip.transformer import TextTransformer, VisionTransformer
from torch import nn

from handclip.errors import UserError

MODEL_CONFIGS = Path(__file__).parent / "model_configs"
WEIGHT_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".safetensors"}
HUB_PROBE_TIMEOUT_S = 3.0
PIXEL_STATS = {  # model.pixel_stats → (mean, std); "auto": the weights' own preprocessing
    "clip": (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

open_clip.add_model_config(MODEL_CONFIGS)


class Backbone(nn.Module):
    """An open_clip image tower (``.visual``), plus the frozen text tower when asked for.

    ``kind`` is "vit" or "rn"; ``dims`` maps each feature of ``forward`` to its size;
    ``map_size`` is the (rows, columns) of ``map``; ``image_size``, ``mean`` and ``std`` are the
    preprocessing the weights expect.
    """

    def __init__(self, clip: nn.Module, arch: str, keep_text: bool, quick_gelu: bool):
        super().__init__()
        visual = clip.visual
        self.arch = arch
        self.quick_gelu = quick_gelu
        self.kind = _tower_kind(visual, arch)
        self.visual = visual
        preprocess = visual.preprocess_cfg
        size = preprocess["size"]
        self.image_size = int(size if isinstance(size, int) else size[0])
        self.mean, self.std = tuple(preprocess["mean"]), tuple(preprocess["std"])
        if self.kind == "vit":
            width = visual.transformer.width
            self.dims = {"proj": visual.output_dim, "pre_proj": width, "map": width, "penultimate": width}
            self.map_size = tuple(visual.grid_size)
        else:
            channels = visual.attnpool.k_proj.in_features
            side = math.isqrt(visual.attnpool.positional_embedding.shape[0] - 1)
            self.dims = {"proj": visual.output_dim, "pre_proj": channels, "map": channels,
                         "penultimate": visual.layer3[-1].conv3.out_channels}
            self.map_size = (side, side)
        self.text = clip.text if keep_text else None
        self.tokenizer = open_clip.get_tokenizer(arch) if keep_text else None
        if self.text is not None:
            self.text.requires_grad_(False)
        self.bn_policy = "train"  # set by models.freezing.apply_freezing

    def architecture(self) -> dict:
        """Every choice that shapes the features besides the weights and the config's arch: what
        ``create_backbone(arch, "none", **architecture)`` needs to rebuild this backbone exactly."""
        return {"quick_gelu": self.quick_gelu, "image_size": self.image_size,
                "preprocess": {"mean": list(self.mean), "std": list(self.std)}}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.kind == "vit":
            # The last two blocks' tokens, un-normalised; ln_post here applies to the last only.
            out = self.visual.forward_intermediates(images, indices=2, output_fmt="NLC", output_extra_tokens=True)
            penultimate, last = out["image_intermediates_prefix"]
            patches = self.visual.ln_post(out["image_intermediates"][1])
            rows, columns = self.map_size
            # shape[0], not len(): the batch stays symbolic when the model is exported (ONNX)
            feature_map = patches.transpose(1, 2).reshape(patches.shape[0], -1, rows, columns)
            return {"proj": out["image_features"], "pre_proj": self.visual.ln_post(last[:, 0]), "map": feature_map,
                    "penultimate": penultimate[:, 0]}
        out = self.visual.forward_intermediates(images, indices=2)
        penultimate_map, feature_map = out["image_intermediates"]
        return {"proj": out["image_features"], "pre_proj": feature_map.mean(dim=(2, 3)), "map": feature_map,
                "penultimate": penultimate_map.mean(dim=(2, 3))}

    def layer_groups(self) -> list[list[nn.Module]]:
        """Stem, each transformer block / residual stage, then the final group (ViT: ``ln_post``
        and ``proj``; RN: the attention pool). Bare parameters come wrapped in a ParameterList."""
        v = self.visual
        if self.kind == "vit":
            stem = [v.conv1, v.ln_pre, nn.ParameterList([v.class_embedding, v.positional_embedding])]
            blocks = list(v.transformer.resblocks)
        else:
            stem = [v.conv1, v.bn1, v.conv2, v.bn2, v.conv3, v.bn3]
            blocks = [v.layer1, v.layer2, v.layer3, v.layer4]
        grouped = {id(p) for module in (*stem, *blocks) for p in module.parameters()}
        final = nn.ParameterList([p for p in v.parameters() if id(p) not in grouped])
        return [stem, *([block] for block in blocks), [final]]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.text is not None:
            self.text.eval()
        # Frozen layers keep their BatchNorm statistics too, so they stay exactly as loaded.
        for module in self.visual.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
                    self.bn_policy == "frozen" or not any(p.requires_grad for p in module.parameters())):
                module.eval()
        return self

    # ---- text tower (only with keep_text=True) --------------------------------------------------
    @property
    def token_embedding(self) -> nn.Embedding:
        return self._clip_text().token_embedding

    def encode_text_embeddings(self, prompt_embeds: torch.Tensor, eot_positions: torch.Tensor) -> torch.Tensor:
        """Run the text transformer on token EMBEDDINGS (N, L, width), e.g. prompts with learned
        tokens (CLIP-ReID); the feature is taken at ``eot_positions`` (N,) as CLIP does."""
        text = self._clip_text()
        length = prompt_embeds.shape[1]
        x = prompt_embeds + text.positional_embedding[:length]
        mask = None if text.attn_mask is None else text.attn_mask[:length, :length]
        x = text.ln_final(text.transformer(x, attn_mask=mask))
        x = x[torch.arange(x.shape[0], device=x.device), eot_positions]
        projection = text.text_projection
        if projection is None:
            return x
        return projection(x) if isinstance(projection, nn.Linear) else x @ projection

    def _text_tower(self) -> nn.Module:
        if self.text is None:
            raise RuntimeError("this backbone was built without its text tower (keep_text=False)")
        return self.text

    def _clip_text(self) -> TextTransformer:
        text = self._text_tower()
        if not isinstance(text, TextTransformer) or text.cls_emb is not None or text.use_pad_mask:
            raise UserError(f"model.arch '{self.arch}': prompt learning needs a CLIP-style text tower, "
                            f"this one is {type(text).__name__}")
        return text


def create_backbone(arch: str, pretrained: str = "none", image_size: int | None = None,
                    keep_text: bool = False, quick_gelu: bool | str = "auto",
                    preprocess: dict | None = None, last_stride: int | None = None,
                    pixel_stats: str = "auto") -> Backbone:
    """Build ``arch`` with weights from ``pretrained`` (an open_clip tag, a weights file, or "none").

    ``quick_gelu``: True, False, or "auto": on for OpenAI TorchScript archives, for tags whose
    open_clip config says so (``openai``) and for ``*-quickgelu`` archs. ``preprocess``: the mean
    and std to use instead of the tag's (a checkpoint rebuilt without its weights). ``last_stride``
    (RN only; None: the architecture's own) and ``pixel_stats`` as in ModelConfig.
    """
    check_arch(arch)
    weights_path, tag_cfg = _resolve_weights(arch, pretrained)
    state_dict, openai_archive = _read_weights(weights_path) if weights_path else ({}, False)
    use_quick_gelu = _resolve_quick_gelu(arch, quick_gelu, openai_archive or bool(tag_cfg.get("quick_gelu")))
    with _quiet_logging():
        clip = open_clip.create_model(
            arch, pretrained=None, force_image_size=image_size, force_custom_text=True,
            # OpenAI's weights were trained with QuickGELU; open_clip 3 no longer switches by itself.
            force_quick_gelu=use_quick_gelu,
            force_preprocess_cfg=preprocess or {k: tag_cfg[k] for k in ("mean", "std") if k in tag_cfg})
    if quick_gelu == "auto" and not use_quick_gelu and weights_path and not tag_cfg \
            and _uses_gelu(clip if keep_text else clip.visual):
        _tell_quick_gelu_unknown(weights_path, arch)
    if last_stride is not None:
        _set_last_stride(clip.visual, last_stride, arch)
    if weights_path:
        _load_towers(clip, state_dict, weights_path, arch, keep_text)
    backbone = Backbone(clip, arch, keep_text, use_quick_gelu)
    if pixel_stats != "auto":
        if pixel_stats not in PIXEL_STATS:
            raise UserError(f"config key 'model.pixel_stats': {pixel_stats!r} is not auto, {', '.join(PIXEL_STATS)}")
        backbone.mean, backbone.std = (tuple(v) for v in PIXEL_STATS[pixel_stats])
    return backbone


def is_known_arch(arch: str) -> bool:
    """Whether ``arch`` is an open_clip model name or one of ours (tiny-vit, tiny-rn, tiny-rn-96)."""
    return arch in open_clip.list_models()


def check_arch(arch: str) -> None:
    """A ``UserError`` with suggestions unless ``arch`` is an open_clip model (or one of ours)."""
    if not is_known_arch(arch):
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see open_clip.list_models()"
        raise UserError(f"model.arch '{arch}' is not an open_clip model or tiny-vit/tiny-rn; {hint}")


def implied_architecture(arch: str, pretrained: str, quick_gelu: bool | str = "auto") -> dict:
    """For checkpoints of older handclip, which recorded no architecture: the QuickGELU and
    preprocessing that ``pretrained`` implied, found without loading (or downloading) weights.
    A weights file that is no longer there implies nothing (plain GELU, the arch's statistics)."""
    path = Path(pretrained).expanduser()
    on_disk = pretrained not in ("none", "") and path.is_file()
    tag_cfg = {} if on_disk or pretrained in ("none", "") else get_pretrained_cfg(arch, pretrained)
    implied = (on_disk and _is_torchscript_archive(path)) or bool(tag_cfg.get("quick_gelu"))
    return {"quick_gelu": _resolve_quick_gelu(arch, quick_gelu, implied),
            "preprocess": {k: list(tag_cfg[k]) for k in ("mean", "std") if k in tag_cfg} or None}


def _resolve_quick_gelu(arch: str, setting: bool | str, implied_by_weights: bool) -> bool:
    built_in = bool((get_model_config(arch) or {}).get("quick_gelu"))  # the *-quickgelu archs
    if setting is False and built_in:
        raise UserError(f"model.quick_gelu false: {arch} always uses QuickGELU; "
                        f"use the arch without '-quickgelu' instead")
    if setting == "auto":
        return built_in or implied_by_weights
    return bool(setting)


_TOLD_QUICK_GELU: set[Path] = set()


def _uses_gelu(module: nn.Module) -> bool:
    """Whether the choice of GELU matters: CLIP's ResNet image tower has none (ReLU only)."""
    return any(isinstance(m, nn.GELU) for m in module.modules())


def _tell_quick_gelu_unknown(path: Path, arch: str) -> None:
    """A state dict does not say which activation its model used; say so once per file."""
    if path in _TOLD_QUICK_GELU:
        return
    _TOLD_QUICK_GELU.add(path)
    variant = f"{arch}-quickgelu"
    alternative = f" or the arch {variant}" if variant in open_clip.list_models() else ""
    print(f"handclip: note: {path}: a state dict does not say whether its model used QuickGELU, so {arch} "
          f"is built with plain GELU; OpenAI's CLIP weights need QuickGELU: set model.quick_gelu=true "
          f"(--quick-gelu true){alternative}", file=sys.stderr)


def _set_last_stride(visual: nn.Module, stride: int, arch: str) -> None:
    """RN: the last residual stage downsamples by ``stride`` (2 as built, or 1). Stride 1 drops the
    two average pools of its first block (no weights change) and gives the attention pool a
    positional grid for the doubled map (the loaded one is interpolated to it)."""
    if not isinstance(visual, ModifiedResNet):
        raise UserError(f"config key 'model.last_stride': {arch} is not a ResNet; only RN towers have a last "
                        f"stride (leave it null)")
    if stride == 2:
        return
    if stride != 1:
        raise UserError(f"config key 'model.last_stride': {stride!r} is not 1 or 2")
    first = visual.layer4[0]
    first.avgpool = nn.Identity()
    first.downsample._modules["-1"] = nn.Identity()  # the pool before its 1x1 projection
    first.stride = 1
    side = -(-visual.image_size // 2) // 8  # the stem's stride-2 convolution, then three halvings
    pool = visual.attnpool
    width = pool.positional_embedding.shape[1]
    pool.positional_embedding = nn.Parameter(torch.randn(side * side + 1, width) / width ** 0.5)


def _tower_kind(visual: nn.Module, arch: str) -> str:
    if isinstance(visual, ModifiedResNet):
        return "rn"
    if isinstance(visual, VisionTransformer) and visual.attn_pool is None and visual.pool_type == "tok" \
            and not visual.final_ln_after_pool:
        return "vit"
    raise UserError(f"model.arch '{arch}': its image tower ({type(visual).__name__}) is not supported; "
                    f"handclip takes CLIP ViT and ModifiedResNet towers such as ViT-B-16 and RN50")


# ---- where the weights come from ------------------------------------------------------------------
def _resolve_weights(arch: str, pretrained: str) -> tuple[Path | None, dict]:
    """(weights file or None, the open_clip tag's config or {})."""
    if pretrained in ("none", ""):
        return None, {}
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path, {}
    tag_cfg = get_pretrained_cfg(arch, pretrained)
    if tag_cfg:
        return Path(_download_tag(arch, pretrained, tag_cfg)), tag_cfg
    if path.exists():
        raise UserError(f"pretrained {path}: is a folder, not a weights file")
    if path.suffix in WEIGHT_SUFFIXES or os.sep in pretrained:
        raise UserError(f"pretrained weights file {path} not found")
    tags = list_pretrained_tags_by_model(arch)
    known = f"its tags: {', '.join(tags)}" if tags else "it has no open_clip tags"
    raise UserError(f"pretrained '{pretrained}' is neither a weights file nor an open_clip tag of {arch} ({known})")


def _download_tag(arch: str, tag: str, cfg: dict) -> str:
    offline = (f"pretrained tag '{tag}' for {arch} needs a download, and this machine is offline; "
               f"pass a local weights file instead: --pretrained /path/to/{arch}.pt")
    with contextlib.suppress(Exception):
        return _hub_file(cfg["hf_hub"], local_only=True)  # already in the Hugging Face cache
    # Checked first because open_clip retries for about 47 s before failing without a network.
    if _hub_offline() or not _hub_reachable():
        raise UserError(offline)
    try:
        return _hub_file(cfg["hf_hub"], local_only=False)
    except Exception as exc:
        raise UserError(f"{offline} (the download failed: {_first_line(exc)})") from None


def _hub_file(location: str, local_only: bool) -> str:
    from huggingface_hub import hf_hub_download

    repo, filename = os.path.split(location)  # "org/name/" means open_clip's default file names
    names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    for name in names[:-1]:
        with contextlib.suppress(Exception):
            return hf_hub_download(repo, name, local_files_only=local_only)
    return hf_hub_download(repo, names[-1], local_files_only=local_only)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable() -> bool:
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


# ---- reading and loading weights ------------------------------------------------------------------
def _read_safetensors(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _read_torchscript(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; OpenAI's files are not
        return torch.jit.load(str(path), map_location="cpu").state_dict()


def _read_state_dict(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


# A weights file's format → its reader; none unpickles Python objects.
WEIGHT_FORMATS = {"safetensors": _read_safetensors, "openai-torchscript": _read_torchscript,
                  "state-dict": _read_state_dict}


def weight_format(path: Path) -> str:
    if path.suffix == ".safetensors":
        return "safetensors"
    return "openai-torchscript" if _is_torchscript_archive(path) else "state-dict"


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """(float32 state dict, whether the file is an OpenAI TorchScript archive)."""
    file_format = weight_format(path)
    try:
        payload = WEIGHT_FORMATS[file_format](path)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: holds pickled Python objects, which handclip never loads; "
                        f"save a plain state dict (torch.save(model.state_dict(), ...)) or .safetensors") from None
    except Exception as exc:
        raise UserError(f"{path}: not a weights file ({_first_line(exc)})") from None
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]  # an open_clip training checkpoint
    if not isinstance(payload, dict):
        raise UserError(f"{path}: not a weights file (it holds a {type(payload).__name__}, not a state dict)")
    state_dict = {key.removeprefix("module."): value.float() if value.is_floating_point() else value
                  for key, value in payload.items() if isinstance(value, torch.Tensor)}
    return state_dict, file_format == "openai-torchscript"


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


def _load_towers(clip: nn.Module, state_dict: dict, path: Path, arch: str, keep_text: bool) -> None:
    state_dict = convert_to_custom_text_state_dict(state_dict)  # OpenAI layout: text keys at top level
    resize_pos_embed(state_dict, clip)
    _resize_attnpool_embedding(state_dict, clip.visual)
    towers = {"visual": clip.visual, **({"text": clip.text} if keep_text else {})}
    for prefix, tower in towers.items():
        weights = {k[len(prefix) + 1:]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}
        _check_fits(tower, weights, path, arch, prefix)
        tower.load_state_dict(weights)


def _check_fits(tower: nn.Module, weights: dict, path: Path, arch: str, prefix: str) -> None:
    for key, tensor in tower.state_dict().items():
        if key not in weights:
            raise UserError(f"{path}: the weights do not fit {arch} (the file has no '{prefix}.{key}')")
        if weights[key].shape != tensor.shape:
            raise UserError(f"{path}: the weights do not fit {arch} ('{prefix}.{key}' is "
                            f"{tuple(weights[key].shape)} in the file, {tuple(tensor.shape)} in the model)")
    unexpected = sorted(weights.keys() - tower.state_dict().keys())
    if unexpected:
        raise UserError(f"{path}: the weights do not fit {arch} (the file has an unknown '{prefix}.{unexpected[0]}')")


def _resize_attnpool_embedding(state_dict: dict, visual: nn.Module) -> None:
    """RN: interpolate the attention pool's positional grid to this image size (open_clip does ViT only)."""
    key = "visual.attnpool.positional_embedding"
    old = state_dict.get(key)
    if old is None or not isinstance(visual, ModifiedResNet):
        return
    target = visual.attnpool.positional_embedding
    old_side, new_side = math.isqrt(old.shape[0] - 1), math.isqrt(target.shape[0] - 1)
    if old.shape == target.shape or old_side ** 2 + 1 != old.shape[0] or old.shape[1] != target.shape[1]:
        return  # nothing to do, or a mismatch that _check_fits reports
    grid = old[1:].reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    state_dict[key] = torch.cat([old[:1], grid.permute(0, 2, 3, 1).reshape(new_side * new_side, -1)])


@contextlib.contextmanager
def _quiet_logging():
    """open_clip warns "initialized randomly" on every build; handclip loads the weights itself."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
