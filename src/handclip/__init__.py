"""handclip: fine-tune CLIP image encoders for hand-based person re-identification.

Three lines for a user::

    import handclip
    model = handclip.load_model("runs/my_run/checkpoints/best.pt")  # or ("ViT-B-16", pretrained="openai")
    features = model.encode(["query.jpg", "gallery/a.jpg"])  # (2, D), L2-normalised

Likelihood ratios from a calibration folder of ``handclip calibrate``::

    calibrator = handclip.load_calibrator("cal/dorsal_r")
    log10_lr = calibrator.llr(features[1:] @ features[0])   # cosine similarities → bounded log10 LRs
"""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("handclip")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"

from handclip import forensic  # light: handclip.forensic.verbal_equivalent without another import

__all__ = ["__version__", "forensic", "load_calibrator", "load_model"]


def load_model(path_or_arch, pretrained=None, device="cpu", quick_gelu="auto"):
    """A fine-tuned checkpoint (a path) or a zero-shot CLIP (an arch name with ``pretrained``: an
    open_clip tag, a weights file or "none"); returns an encoder with ``.encode(images_or_paths)``."""
    from handclip.engine.loading import load_model as _load_model

    return _load_model(path_or_arch, pretrained=pretrained, device=device, quick_gelu=quick_gelu)


def load_calibrator(path):
    """Load ``CAL_DIR/calibrator.json``; returns a calibrator with ``.llr(scores)`` (log10 LRs)."""
    from handclip.forensic.calibration import load_calibrator as _load_calibrator

    return _load_calibrator(path)
