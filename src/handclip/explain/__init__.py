"""Explanations: which regions of a query and a candidate raise their similarity.

    encoder = handclip.load_model("run/checkpoints/best.pt")
    result = explain_pair(encoder, "query.jpg", "candidate.jpg")   # score, heatmap_a, heatmap_b
    overlay(PIL.Image.open("query.jpg"), result["heatmap_a"]).save("query_overlay.png")
"""
from handclip.explain.overlay import overlay
from handclip.explain.relevance import explain_pair

__all__ = ["explain_pair", "overlay"]
