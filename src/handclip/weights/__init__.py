"""Weights that ship with handclip: the demo's pretrained backbone.

``DEMO_BACKBONE`` is the image tower of a tiny CLIP-style ResNet (``DEMO_BACKBONE_ARCH``, 96 px,
1.3M parameters) that tools/pretrain_demo_backbone.py trained with ID + triplet loss on synthetic
studio photos of 300 other people than the demo's. It stands in for CLIP, whose weights cannot be
downloaded here: it is not CLIP and has seen nothing but synthetic hands. It is an open_clip state
dict (``visual.*`` keys, no text tower) in safetensors, loaded exactly as a user's CLIP weights are::

    handclip evaluate --zero-shot --arch tiny-rn-96 --pretrained "$(python -m handclip.weights)" ...

The file's safetensors metadata says how it was made.
"""
from pathlib import Path

DEMO_BACKBONE_ARCH = "tiny-rn-96"
DEMO_BACKBONE = Path(__file__).with_name("demo-tiny-rn-96.safetensors")
