"""``handclip explain``: the explanation of one query–candidate pair as files.

``DIR/explanation.json`` (score, inputs, checkpoint sha256, method), and for each of ``query`` and
``candidate``: ``<role>_overlay.png`` (the heatmap over the photo) and ``<role>_heatmap.npy``
(float32 (H, W) in [0, 1], the photo's pixel size).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from handclip.data.images import read_image
from handclip.explain.overlay import overlay
from handclip.explain.relevance import explain_pair
from handclip.fileio import atomic_directory, atomic_write_json, sha256_file

METHOD = ("gradient x activation of the cosine similarity of the final embeddings; ViT: tokens entering "
          "the last transformer block, ResNet: the last feature map; positive part, scaled to a maximum of 1")


def write_explanation(checkpoint: str | Path, query: str | Path, candidate: str | Path, out: str | Path,
                      device: str = "auto") -> dict:
    """Explain ``query`` against ``candidate`` with the model in ``checkpoint``; write ``out`` whole
    (replacing it) and return the JSON summary. Bad input raises ``UserError`` before anything is written."""
    from handclip.engine.checkpoint import load_model

    images = {"query": read_image(query), "candidate": read_image(candidate)}
    encoder = load_model(checkpoint, device=device)
    result = explain_pair(encoder, query, candidate)
    heatmaps = {"query": result["heatmap_a"], "candidate": result["heatmap_b"]}
    summary = {
        "score": result["score"],
        "query": str(query),
        "candidate": str(candidate),
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint),
        "method": METHOD,
        "files": {role: {"overlay": f"{role}_overlay.png", "heatmap": f"{role}_heatmap.npy"} for role in images},
    }
    with atomic_directory(out) as tmp:
        for role, image in images.items():
            overlay(image, heatmaps[role]).save(tmp / f"{role}_overlay.png")
            np.save(tmp / f"{role}_heatmap.npy", heatmaps[role].astype(np.float32))
        atomic_write_json(tmp / "explanation.json", summary)
    return summary
