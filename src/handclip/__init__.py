"""handclip: fine-tune CLIP image encoders for hand-based person re-identification.

Three lines for a user::

    import handclip
    model = handclip.load_model("runs/my_run/checkpoints/best.pt")  # or ("ViT-B-16", pretrained="openai")
    features = model.encode(["query.jpg", "gallery/a.jpg"])  # (2, D), L2-normalised
"""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("handclip")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"

__all__ = ["__version__", "load_model"]


def load_model(path_or_arch, pretrained=None, device="cpu", quick_gelu="auto"):
    """A fine-tuned checkpoint (a path) or a zero-shot CLIP (an arch name with ``pretrained``: an
    open_clip tag, a weights file or "none"); returns an encoder with ``.encode(images_or_paths)``."""
    from handclip.engine.loading import load_model as _load_model

    return _load_model(path_or_arch, pretrained=pretrained, device=device, quick_gelu=quick_gelu)
