#!/usr/bin/env python3
"""Pretrain the demo's backbone: src/handclip/weights/demo-tiny-rn-96.safetensors.

The demo needs a pretrained model to evaluate zero-shot and fine-tune, as a user does with CLIP,
whose weights cannot be downloaded here. This script makes a small stand-in with the library
alone, seeded, so anyone can rerun it:

1. synthesise hands of other people than the demo's (synth seed 1; the demo's are seed 0) in
   another style (``studio``: plain backdrop, upright, even light; the demo's are ``varied``),
   all four aspects;
2. prepare the split protocol and train a random-init tiny ViT on the train identities with
   ID + triplet loss (tools/pretrain_demo_backbone.yaml), each hand of a person a class;
3. keep the image tower as an open_clip state dict (``visual.*``) in safetensors, with how it was
   made in the file's metadata, and check that it loads through ``--pretrained FILE``
   (models.backbones.create_backbone) and how it ranks its own held-out studio identities.

    PYTHONPATH=src python tools/pretrain_demo_backbone.py [--work DIR] [--out FILE]

About 25 minutes on one CPU core.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save

from handclip.data.prepare import prepare_11k
from handclip.data.synth import synthesize
from handclip.engine.checkpoint import load_checkpoint
from handclip.engine.evaluation import EvaluateOptions, run_evaluate
from handclip.engine.train import run_training
from handclip.errors import UserError
from handclip.fileio import atomic_write_bytes
from handclip.models.backbones import create_backbone
from handclip.weights import DEMO_BACKBONE, DEMO_BACKBONE_ARCH

CONFIG = Path(__file__).with_name("pretrain_demo_backbone.yaml")
SEED = 1  # synth seed 0 draws the demo's people; seed 1 draws others
SIZE, STYLE = (160, 120), "studio"
FULL = dict(ids=300, per_aspect=6, epochs=None)  # epochs: the config's
QUICK = dict(ids=12, per_aspect=3, epochs=1)  # checks the pipeline in seconds (tests); not for shipping
TOWER_PREFIX = "backbone.visual."  # the image tower's keys in a handclip checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=DEMO_BACKBONE)
    parser.add_argument("--quick", action="store_true", help="a tiny run that checks the pipeline (tests)")
    args = parser.parse_args(argv)
    # One thread: the same sums in the same order on any machine, and no OpenMP threads spinning
    # against other jobs on a shared CPU (with 2 threads beside other work an epoch took 6x longer).
    torch.set_num_threads(1)
    plan = QUICK if args.quick else FULL
    ids, per_aspect = plan["ids"], plan["per_aspect"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        os.environ.setdefault("HANDCLIP_CACHE_DIR", str(work / "image-cache"))  # not ~/.cache: used once
        data, splits = work / "data", work / "data" / "splits"
        print(f"synthesising {ids} people, {STYLE} style, seed {SEED} → {data}", flush=True)
        synthesize(data, ids=ids, per_aspect=per_aspect, size=SIZE, seed=SEED, style=STYLE)
        prepare_11k(root=data, out=splits, seed=SEED, num_splits=1)
        overrides = {"train.device": "cpu", **({"train.epochs": plan["epochs"]} if plan["epochs"] else {})}
        run = run_training(config_path=CONFIG, overrides=overrides, data_root=data, splits=splits, out=work / "run")
        checkpoint = load_checkpoint(run / "checkpoints" / "best.pt")
        metadata = {"arch": DEMO_BACKBONE_ARCH, "made_by": "tools/pretrain_demo_backbone.py",
                    "data": f"handclip synth --ids {ids} --per-aspect {per_aspect} --size {SIZE[0]}x{SIZE[1]} "
                            f"--seed {SEED} --style {STYLE}; train identities of all four aspects",
                    "config": CONFIG.read_text(), "epoch": str(checkpoint["epoch"] + 1),
                    "torch": torch.__version__, "not_clip": "a stand-in for CLIP trained on synthetic hands only"}
        export_image_tower(checkpoint, args.out, metadata)
        create_backbone(DEMO_BACKBONE_ARCH, str(args.out))  # fails loudly if the file does not fit
        held_out = run_evaluate(EvaluateOptions(data_root=data, splits=splits, out=work / "held_out", zero_shot=True,
                                                arch=DEMO_BACKBONE_ARCH, pretrained=str(args.out), aspect="dorsal_r",
                                                device="cpu", quiet=True))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.0f} s; "
          f"zero-shot on its own held-out studio people (dorsal_r): "
          + json.dumps({k: round(100 * held_out["mean"][k], 1) for k in ("rank1", "mAP")}))
    return 0


def export_image_tower(checkpoint: dict, path: Path, metadata: dict[str, str]) -> None:
    """A handclip checkpoint's image tower as an open_clip state dict (``visual.*``) in safetensors."""
    tower = {key.removeprefix("backbone."): tensor.contiguous() for key, tensor in checkpoint["model"].items()
             if key.startswith(TOWER_PREFIX)}
    atomic_write_bytes(path, save(tower, metadata=metadata))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:  # e.g. --work holding an earlier run: one line, as the CLI says it
        print(f"pretrain_demo_backbone: error: {exc}", file=sys.stderr)
        sys.exit(2)
