"""``handclip export``: a checkpoint as one ONNX file that an integrator cannot feed wrongly.

The graph takes uint8 RGB images ``(N, 3, S, S)`` (N dynamic, S the model's input size), does the
evaluation preprocessing itself (``EvalTransform`` at size S: scale to [0, 1], subtract the mean,
divide by the std) and returns the L2-normalised features ``(N, D)``, the same as
``load_model(checkpoint).encode`` of the same S×S images. Resizing a photo to S×S stays with the
caller (handclip squeezes the whole photo to the square, bicubic; see ``data/images.py``).
``OUT.json`` beside it records the input size, the feature size, the checkpoint's sha256, the opset
and the handclip version.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from handclip.errors import UserError
from handclip.fileio import atomic_write_bytes, atomic_write_json, sha256_file

# Opset 18 runs on every onnxruntime since 1.14 and on TensorRT 8.6+; the exporter converts down to it.
OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "features"
EMBEDDED_METADATA = ("input_size", "feature_size", "checkpoint_sha256", "opset", "handclip_version")
# A single-file ONNX model is one protobuf message, which cannot exceed 2 GiB.
PROTOBUF_LIMIT_BYTES = 2 ** 31


class PreprocessingEncoder(nn.Module):
    """uint8 ``(N, 3, S, S)`` → L2-normalised float32 features ``(N, D)``: EvalTransform's arithmetic
    at size S, the model's test feature, then the normalisation of ``Encoder.embed_uint8``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(model.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(model.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() * (1.0 / 255)  # torchvision's to_dtype(scale=True) for uint8
        x = (x - self.mean) / self.std
        return F.normalize(self.model(x)["embedding"].float(), dim=1)


def export_onnx(checkpoint: str | Path, out: str | Path, opset: int | None = None) -> dict:
    """Write ``out`` (ONNX, dynamic batch) and ``out.json``; return the metadata written there.
    ``opset`` defaults to :data:`OPSET`."""
    from handclip import __version__
    from handclip.engine.checkpoint import build_model_from_checkpoint, load_checkpoint

    try:
        import onnxscript  # noqa: F401 — torch's exporter needs it
        from onnx import StringStringEntryProto
    except ImportError as exc:
        raise UserError(f"export needs the packages of the 'export' extra ({exc.name} is missing): "
                        f"pip install 'handclip[export]'") from None
    checkpoint, out, opset = Path(checkpoint), Path(out), opset or OPSET
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give the .onnx file to write")
    payload = load_checkpoint(checkpoint)
    model, config = build_model_from_checkpoint(payload, checkpoint)
    _check_fits_one_file(model, checkpoint)
    encoder = PreprocessingEncoder(model.eval()).eval()
    size = model.image_size
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)  # batch 2: a batch of 1 would be specialised
    with _quiet_exporter():
        program = torch.onnx.export(encoder, (example,), dynamo=True, opset_version=opset,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    metadata = {
        "format": "handclip-onnx",
        "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["batch", 3, size, size], "layout": "NCHW, RGB"},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", model.embedding_dim],
                   "l2_normalised": True},
        "input_size": size,
        "feature_size": model.embedding_dim,
        "preprocessing": {"in_graph": "x / 255, then (x - mean) / std", "mean": list(model.mean),
                          "std": list(model.std),
                          "caller": "resize the whole photo to input_size x input_size (bicubic), no crop"},
        "arch": config.model.arch,
        "head": config.model.head,
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint),
        "opset": opset,
        "handclip_version": __version__,
    }
    onnx_model = program.model_proto
    # the essentials also travel inside the .onnx file, for whoever receives it alone
    onnx_model.metadata_props.extend(StringStringEntryProto(key=f"handclip.{key}", value=str(metadata[key]))
                                     for key in EMBEDDED_METADATA)
    atomic_write_bytes(out, onnx_model.SerializeToString())
    atomic_write_json(out.with_name(out.name + ".json"), metadata)
    return metadata


def _check_fits_one_file(model: nn.Module, checkpoint: Path) -> None:
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if size >= PROTOBUF_LIMIT_BYTES:
        raise UserError(f"{checkpoint}: the model's {size / 2 ** 30:.1f} GiB of weights exceed the 2 GiB "
                        f"of a single-file ONNX model")


@contextlib.contextmanager
def _quiet_exporter():
    """onnxscript's optimiser logs a warning for every op it does not fold; none concern the user."""
    logger = logging.getLogger("onnxscript")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
