"""handclip: fine-tune CLIP image encoders for hand-based person re-identification.

Three lines for a user::

    import handclip
    model = handclip.load_model("runs/my_run/checkpoints/best.pt")
    features = model.encode(["query.jpg", "gallery/a.jpg"])  # (2, D), L2-normalised
"""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("handclip")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"

__all__ = ["__version__", "load_model"]


def load_model(path, device="cpu"):
    """Load a handclip checkpoint; returns an encoder with ``.encode(images_or_paths)``."""
    from handclip.engine.checkpoint import load_model as _load_model

    return _load_model(path, device=device)
