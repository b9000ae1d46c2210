"""Typed experiment configuration: YAML files in configs/, validated, with ``key=value`` overrides.

A config is a tree of dataclasses. Every key is known and typed: an unknown key or a value of
the wrong type raises :class:`UserError` naming the key (``loss.triplett``), so a typo never
silently falls back to a default.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from handclip.errors import UserError
from handclip.hand_datasets import ALL_ASPECTS


@dataclass
class ModelConfig:
    arch: str = "ViT-B-16"  # any open_clip model name, or tiny-vit / tiny-rn
    pretrained: str = "openai"  # open_clip tag, local weights file, or "none"
    # QuickGELU (OpenAI's CLIP activation) or plain GELU. auto: on for OpenAI TorchScript archives,
    # tags such as openai and *-quickgelu archs; a state dict or .safetensors of OpenAI's weights
    # needs true. Checkpoints store the resolved value.
    quick_gelu: Union[bool, Literal["auto"]] = "auto"
    image_size: Optional[int] = None  # None: the architecture's native size
    embedding: Literal["proj", "pre_proj", "both"] = "proj"  # CLIP projection output, the features before it, or both
    # What trains: "all", "none" (frozen backbone, only new layers learn), or N = the last N
    # transformer blocks (ViT) / residual stages (RN) plus everything after them.
    unfreeze: Union[int, Literal["all", "none"]] = "all"
    layer_decay: float = 1.0  # layer-wise lr decay per block from the top; 1.0 = off
    bn_policy: Literal["train", "frozen"] = "train"  # RN BatchNorm statistics: update, or keep as loaded
    neck: Literal["none", "bnneck"] = "bnneck"
    metric_feature: Literal["before_bn", "after_bn"] = "before_bn"  # what triplet/center/SupCon see
    test_feature: Literal["before_bn", "after_bn"] = "after_bn"  # what evaluation uses
    classifier: Literal["linear", "cosine", "arcface", "cosface"] = "linear"
    classifier_scale: float = 30.0  # cosine/arcface/cosface logit scale
    classifier_margin: float = 0.3  # arcface (radians) / cosface (cosine) margin
    head: Literal["global", "pcb", "attention"] = "global"
    parts: int = 4  # PCB stripes
    part_direction: Literal["horizontal", "vertical", "both"] = "horizontal"
    # RN only: stride of the last residual stage; 1 doubles the feature map (CLIP-HandID, CLIP-ReID).
    # null: the architecture's own (2).
    last_stride: Optional[Literal[1, 2]] = None
    # Also give the metric losses the class token after the penultimate transformer block (RN: the
    # pooled map of the penultimate stage), with no neck or classifier (CLIP-ReID's img_feature_last).
    penultimate_metric: bool = False
    # Input normalisation: auto = the weights' own (CLIP's for OpenAI); imagenet; half = 0.5 / 0.5.
    pixel_stats: Literal["auto", "clip", "imagenet", "half"] = "auto"


@dataclass
class LossConfig:
    # Weights of each term; 0 turns a term off. Any weighted combination is allowed.
    ce: float = 1.0
    label_smoothing: float = 0.1
    triplet: float = 0.0
    triplet_margin: float = 0.3
    triplet_soft: bool = False  # soft-margin triplet (log(1 + exp(d_ap - d_an)))
    center: float = 0.0
    center_lr: float = 0.5
    supcon: float = 0.0
    supcon_temperature: float = 0.1
    arcface: float = 0.0  # pytorch-metric-learning ArcFaceLoss on the metric feature
    arcface_scale: float = 30.0
    arcface_margin: float = 28.6  # degrees, as pytorch-metric-learning takes it
    i2t: float = 0.0  # CLIP-ReID stage 2: image-to-text cross-entropy against learned identity texts
    # How per-branch terms combine: mean (a weight means the same for any head) or sum (BoT,
    # CLIP-HandID and CLIP-ReID add their branches' losses).
    branch_reduction: Literal["mean", "sum"] = "mean"


@dataclass
class AugmentConfig:
    hflip: float = 0.0  # off by default: a flipped right hand looks like a left hand
    padding: int = 10
    color_jitter: float = 0.0  # strength of brightness/contrast/saturation jitter
    random_erasing: float = 0.5
    # Normalisation follows the model (model.pixel_stats), so evaluation uses the same.
    # Side the stored image is resized to before the random crop to the model's input; null: the
    # input size itself, padded by `padding` and cropped back. CLIP-HandID: 256 (then crop 224).
    resize: Optional[int] = None
    erasing_fill: Literal["zero", "noise"] = "zero"  # noise: N(0, 1) per pixel (timm mode 'pixel', CLIP-ReID)


@dataclass
class DataConfig:
    aspects: list[str] = field(default_factory=lambda: ["dorsal_r"])
    identity: Literal["subject", "subject_aspect"] = "subject"  # cross-aspect training identity
    sampler: Literal["random", "pk"] = "random"
    batch_size: int = 32  # with sampler=pk: P = batch_size // k identities of k images each
    k: int = 4
    aspect_balanced: bool = False
    num_workers: int = 0
    cache: bool = True  # decoded-image cache (uint8 memmap) instead of decoding JPEGs every epoch
    cache_size: Optional[int] = None  # stored side length; None: a little above image_size
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class OptimConfig:
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"  # adam: L2 weight decay added to the gradient
    lr: float = 5e-6  # backbone learning rate
    head_lr_mult: float = 10.0  # new layers (neck, classifiers, heads) learn this much faster
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_epochs: int = 10
    schedule: Literal["cosine", "step", "constant"] = "step"
    milestones: list[int] = field(default_factory=lambda: [40, 60])
    gamma: float = 0.1
    clip_grad: float = 0.0  # max gradient norm; 0 = off
    warmup_start_factor: float = 0.1  # warm-up starts at lr x this and rises linearly to lr
    # Added to the epoch index before the schedule is read: 1 when a reference steps its scheduler
    # before the first epoch (CLIP-ReID), so epoch k (from 1) trains at the schedule's value for k.
    schedule_offset: int = 0
    bias_lr_mult: float = 1.0  # lr of every bias parameter x this (CLIP-ReID: 2)
    bias_weight_decay: Optional[float] = None  # null: optim.weight_decay
    # The fused (one kernel for all parameters) Adam/AdamW/SGD step; auto: on a GPU.
    fused: Union[bool, Literal["auto"]] = "auto"
    # Larger batches: the batch size optim.lr was chosen for. Set, every lr is multiplied by
    # (data.batch_size x processes) / lr_batch_size (linear) or its square root (sqrt); null: as given.
    lr_batch_size: Optional[int] = None
    lr_scaling: Literal["linear", "sqrt"] = "linear"


@dataclass
class PromptConfig:
    """CLIP-ReID two-stage prompt learning (used when stage1_epochs > 0)."""

    stage1_epochs: int = 0
    n_ctx: int = 4  # learned tokens per identity: "A photo of a X X X X hand."
    template: str = "A photo of a {} hand."
    lr: float = 3.5e-4
    batch_size: int = 64
    # CLIP-ReID's stage-1 schedule: linear warm-up from warmup_lr, then cosine down to min_lr.
    weight_decay: float = 1e-4
    warmup_epochs: int = 5
    warmup_lr: float = 1e-5
    min_lr: float = 1e-6
    # cosine: L2-normalised features x 100 (CLIP's logit scale); dot: raw features, temperature 1
    # (CLIP-ReID's code), in both stages.
    similarity: Literal["cosine", "dot"] = "cosine"


@dataclass
class TrainConfig:
    epochs: int = 70
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 on GPU, off on CPU
    # torch.compile of the training forward: false, true (= default), or an inductor mode;
    # reduce-overhead adds CUDA graphs (GPU only, static shapes: P x K or drop-last batches).
    compile: Union[bool, Literal["default", "reduce-overhead", "max-autotune"]] = False
    eval_every: int = 1
    eval_batch_size: int = 128
    # Which epoch best.pt keeps: highest val mAP, highest val classification accuracy (CLIP-HandID),
    # or the last epoch (CLIP-ReID evaluates only its final model).
    best_metric: Literal["val_mAP", "val_acc", "last"] = "val_mAP"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    # Sequential fine-tuning: each stage is a mapping of overrides ({"data.aspects": [...], ...},
    # or nested sections); stage i starts from stage i-1's best checkpoint.
    stages: list[dict] = field(default_factory=list)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str):
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:
        for option in args:
            with contextlib.suppress(UserError):
                return _coerce(value, option, key)
        raise UserError(f"config key '{key}': {value!r} is not one of {' | '.join(_describe(a) for a in args)}")
    if origin is Literal:
        if value not in args:
            raise UserError(f"config key '{key}': {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if tp is type(None):
        if value is not None:
            raise UserError(f"config key '{key}': expected null, got {value!r}")
        return None
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}': expected a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


def _describe(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "|".join(map(str, typing.get_args(tp)))
    return _type_name(tp)


def _build(cls, mapping: Any, prefix: str):
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise UserError(f"config key '{prefix}': expected a mapping, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in mapping.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise UserError(f"config: unknown key '{full}' (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def config_from_dict(mapping: dict) -> Config:
    """Build and validate a :class:`Config` from a nested mapping."""
    config = _build(Config, mapping, "")
    _check_values(config)
    return config


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def parse_override(text: str) -> tuple[str, Any]:
    """``'loss.triplet=1.0'`` → ``('loss.triplet', 1.0)``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: expected key=value, e.g. loss.triplet=1.0")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(mapping: dict, overrides: dict[str, Any]) -> dict:
    """Return a copy of the nested ``mapping`` with dotted-key ``overrides`` set."""
    result = copy.deepcopy(mapping)
    for dotted, value in overrides.items():
        node = result
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"config: cannot set '{dotted}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return result


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"{path}: cannot read config ({exc.strerror or exc})") from None
    try:
        mapping = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}:{where} invalid YAML") from None
    if not isinstance(mapping, dict):
        raise UserError(f"{path}: a config must be a mapping of sections")
    return mapping


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    mapping = read_yaml(path) if path is not None else {}
    try:
        return config_from_dict(apply_overrides(mapping, overrides or {}))
    except UserError as exc:
        raise UserError(f"{path}: {exc}" if path is not None else str(exc)) from None


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def _check_values(config: Config) -> None:
    """Range checks that types alone cannot express."""
    known = set(ALL_ASPECTS)
    for aspect in config.data.aspects:
        if aspect not in known:
            raise UserError(f"config key 'data.aspects': unknown aspect {aspect!r} (known: {', '.join(sorted(known))})")
    if not config.data.aspects:
        raise UserError("config key 'data.aspects': give at least one aspect")
    if isinstance(config.model.unfreeze, int) and config.model.unfreeze < 0:
        raise UserError("config key 'model.unfreeze': must be >= 0, 'all' or 'none'")
    if config.data.batch_size < 1:
        raise UserError("config key 'data.batch_size': must be >= 1")
    if config.data.sampler == "pk" and (config.data.k < 2 or config.data.batch_size % config.data.k):
        raise UserError("config key 'data.k': with sampler pk, k must be >= 2 and divide data.batch_size")
    if config.train.epochs < 0:
        raise UserError("config key 'train.epochs': must be >= 0")
    if config.train.seed < 0:
        raise UserError("config key 'train.seed': must be >= 0")
    if (config.loss.triplet > 0 or config.loss.supcon > 0) and config.data.sampler != "pk":
        raise UserError("config key 'data.sampler': triplet and SupCon losses need identity-balanced batches "
                        "(data.sampler: pk)")
    if config.data.aspect_balanced and config.data.sampler != "pk":
        raise UserError("config key 'data.aspect_balanced': needs data.sampler: pk")
    if isinstance(config.model.last_stride, bool):
        raise UserError("config key 'model.last_stride': expected 1, 2 or null")
    if not 0.0 <= config.optim.warmup_start_factor <= 1.0:
        raise UserError("config key 'optim.warmup_start_factor': must lie in [0, 1]")
    if config.optim.lr_batch_size is not None and config.optim.lr_batch_size < 1:
        raise UserError("config key 'optim.lr_batch_size': must be >= 1 or null")
    if config.optim.schedule_offset < 0:
        raise UserError("config key 'optim.schedule_offset': must be >= 0")
    for section, value in (("loss", config.loss), ):
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if isinstance(v, float) and v < 0:
                raise UserError(f"config key '{section}.{f.name}': must be >= 0")
    for i, stage in enumerate(config.stages):
        # Validate each stage's overrides now rather than when the stage starts hours later.
        try:
            config_from_dict(apply_overrides(_without_stages(config), _flatten(stage)))
        except UserError as exc:
            raise UserError(f"stages[{i}]: {exc}") from None


def _without_stages(config: Config) -> dict:
    mapping = config_to_dict(config)
    mapping["stages"] = []
    return mapping


def _flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in mapping.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(_flatten(value, full))
        else:
            flat[full] = value
    return flat


def stage_config(config: Config, index: int) -> Config:
    """The config of sequential stage ``index``: the base config with that stage's overrides."""
    return config_from_dict(apply_overrides(_without_stages(config), _flatten(config.stages[index])))
