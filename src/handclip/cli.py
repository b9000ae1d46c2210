"""The ``handclip`` command: parses flags and calls the library. No logic lives here.

Every :class:`~handclip.errors.UserError` becomes one line on stderr and exit code 2.
Heavy imports (torch, open_clip) happen inside the handlers so ``handclip synth`` starts fast.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from handclip.errors import UserError


def _prepare(args):
    from handclip.data.prepare import PREPARERS, format_summary

    result = PREPARERS[args.dataset](
        root=args.root,
        out=args.out,
        seed=args.seed,
        num_splits=args.num_splits,
        export_folders=args.export_folders,
        copy=args.copy,
    )
    print(format_summary(result))


def _synth(args):
    from handclip.data.synth import synthesize

    width, _, height = args.size.lower().partition("x")
    try:
        size = (int(width), int(height))
    except ValueError:
        raise UserError(f"--size {args.size!r}: expected WIDTHxHEIGHT, e.g. 400x300") from None
    info = synthesize(args.out, ids=args.ids, per_aspect=args.per_aspect, size=size, seed=args.seed, style=args.style)
    print(f"wrote {info['images']} images of {info['identities']} identities to {args.out}")


def _overrides(args) -> dict:
    from handclip.config import parse_override

    overrides = dict(parse_override(item) for item in args.set or [])
    flag_keys = {
        "epochs": "train.epochs",
        "arch": "model.arch",
        "pretrained": "model.pretrained",
        "image_size": "model.image_size",
        "quick_gelu": "model.quick_gelu",
        "device": "train.device",
        "batch_size": "data.batch_size",
        "seed": "train.seed",
    }
    for flag, key in flag_keys.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    aspects = getattr(args, "aspects", None) or getattr(args, "aspect", None)
    if aspects:
        overrides["data.aspects"] = [a.strip() for a in aspects.split(",") if a.strip()]
    return overrides


def _train(args):
    from handclip.engine.train import run_training

    run_training(
        config_path=args.config,
        overrides=_overrides(args),
        data_root=args.data,
        splits=args.splits,
        out=args.out,
        resume=args.resume,
        init_from=args.init_from,
        quiet=args.quiet,
    )


def _evaluate(args):
    from handclip.engine.evaluation import EvaluateOptions, run_evaluate

    options = EvaluateOptions(
        checkpoints=args.checkpoint or [],
        zero_shot=args.zero_shot,
        arch=args.arch,
        pretrained=args.pretrained,
        image_size=args.image_size,
        data_root=args.data,
        splits=args.splits,
        aspect=args.aspect,
        all_aspects=args.all_aspects,
        query_aspect=args.query_aspect,
        gallery_aspect=args.gallery_aspect,
        gallery_all=args.gallery_all,
        num_splits=args.num_splits,
        out=args.out,
        flip=args.flip,
        rerank=args.rerank,
        rerank_k1=args.k1,
        rerank_k2=args.k2,
        rerank_lambda=args.lambda_value,
        distance=args.distance,
        fusion=args.fusion,
        batch_size=args.batch_size,
        device=args.device,
        show_queries=args.show_query or [],
        quiet=args.quiet,
        protocol=args.protocol,
        save_scores=args.save_scores,
        allow_overlap=args.allow_overlap,
        quick_gelu="auto" if args.quick_gelu is None else args.quick_gelu,
    )
    run_evaluate(options)


def _calibrate(args):
    from handclip.engine.calibrate import CalibrateOptions, run_calibrate

    run_calibrate(CalibrateOptions(
        checkpoint=args.checkpoint, data_root=args.data, splits=args.splits, aspect=args.aspect, out=args.out,
        method=args.method, calibration_splits=[n.strip() for n in args.calibration_splits.split(",") if n.strip()],
        folds=args.folds, seed=args.seed, batch_size=args.batch_size, device=args.device, quiet=args.quiet,
    ))


def _compare(args):
    from handclip.engine.compare import run_compare

    run_compare(checkpoint=args.checkpoint, calibration=args.calibration, questioned=args.questioned,
                references=args.references, out=args.out, device=args.device, quiet=args.quiet)


def _demo(args):
    from handclip.engine.demo import run_demo

    run_demo(out=args.out, quick=args.quick, quiet=args.quiet)


def _bench(args):
    from handclip.engine.bench import run_bench

    run_bench(
        config_path=args.config,
        overrides=_overrides(args),
        data_root=args.data,
        splits=args.splits,
        out=args.out,
        steps=args.steps,
    )


def _benchmark(args):
    from handclip.engine.benchmark import BenchmarkOptions, run_benchmark

    aspects = [a.strip() for a in args.benchmark_aspects.split(",") if a.strip()] if args.benchmark_aspects else None
    run_benchmark(BenchmarkOptions(config=args.config, out=args.out, data_11k=args.data_11k, data_hd=args.data_hd,
                                   aspects=aspects, overrides=_overrides(args), num_splits=args.num_splits,
                                   device=args.device, quiet=args.quiet))


def _cache_build(args):
    from handclip.engine.cache_cli import build_cache_for_splits

    build_cache_for_splits(
        data_root=args.data, splits=args.splits, aspects=args.aspect, size=args.size, quiet=args.quiet
    )


def _gallery_add(args):
    from handclip.gallery import collect_images, enrol, read_manifest

    if bool(args.manifest) != bool(args.data):
        raise UserError("gallery add: --manifest CSV and --data ROOT go together")
    items = collect_images(args.paths) + (read_manifest(args.manifest, args.data) if args.manifest else [])
    summary = enrol(args.db, args.checkpoint, items, batch_size=args.batch_size, device=args.device,
                    progress=not args.quiet)
    print(f"added {summary['added']} images, skipped {summary['skipped']} already enrolled; "
          f"{args.db} holds {summary['images']}")


def _gallery_info(args):
    import json

    from handclip.gallery import Gallery, format_info

    with Gallery.open(args.db) as gallery:
        info = gallery.info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))


def _gallery_remove(args):
    from handclip.gallery import Gallery

    with Gallery.open(args.db) as gallery:
        removed = gallery.remove(identity=args.identity, sha256=args.image)
    print(f"removed {removed} images from {args.db}")


def _search(args):
    from handclip.search import run_search

    results = run_search(args.db, args.queries, args.out, top=args.top, calibration=args.calibration,
                         checkpoint=args.checkpoint, device=args.device)
    print(f"searched {len(results['queries'])} queries; results: {args.out / 'results.json'}, "
          f"{args.out / 'results.html'}")


def _serve(args):
    from handclip.serve import run_server

    run_server(args.db, host=args.host, port=args.port, token=args.token, calibration=args.calibration,
               checkpoint=args.checkpoint, device=args.device)


class _Parser(argparse.ArgumentParser):
    """Bad flags end like every other user error: one ``handclip: error:`` line, exit code 2
    (argparse's own error prints the usage first)."""

    def error(self, message):
        command = self.prog.removeprefix("handclip").strip()
        self.exit(2, f"handclip: error: {command + ': ' if command else ''}{message}\n")


def _explain(args):
    from handclip.explain.writer import write_explanation

    summary = write_explanation(args.checkpoint, args.query, args.candidate, args.out, device=args.device)
    print(f"score {summary['score']:.4f}; wrote heatmaps and explanation.json to {args.out}")


def _export(args):
    from handclip.engine.export import export_onnx

    metadata = export_onnx(args.checkpoint, args.out, opset=args.opset)
    print(f"wrote {args.out} and {args.out}.json: uint8 (N, 3, {metadata['input_size']}, {metadata['input_size']}) "
          f"→ {metadata['feature_size']}-d L2-normalised features")


def build_parser() -> argparse.ArgumentParser:
    from handclip.hand_datasets import HAND_DATASETS
    from handclip.metrics import RERANK_K1, RERANK_K2, RERANK_LAMBDA
    from handclip.published import PROTOCOLS

    parser = _Parser(prog="handclip", description="Fine-tune CLIP image encoders for hand re-identification, "
                     "evaluate them under the published protocols, and turn them into forensic evidence.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="write the published split protocol as CSV manifests")
    p.add_argument("dataset", choices=list(HAND_DATASETS))
    p.add_argument("--root", required=True, type=Path, help="dataset download folder")
    p.add_argument("--out", type=Path, help="splits folder (default ROOT/splits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-splits", type=int, default=10)
    p.add_argument("--export-folders", type=Path, metavar="DIR",
                   help="also write the older tools' folder tree (symlinks)")
    p.add_argument("--copy", action="store_true", help="with --export-folders: copy images instead of linking")
    p.set_defaults(handler=_prepare)

    p = sub.add_parser("synth", help="generate synthetic hand photos in the 11k Hands format")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--ids", type=int, default=40)
    p.add_argument("--per-aspect", type=int, default=4, help="photos per identity and aspect")
    p.add_argument("--size", default="160x120", help="WIDTHxHEIGHT (11k is 1600x1200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--style", choices=["varied", "studio"], default="varied",
                   help="varied scenes (default) or studio photos (plain backdrop, upright, even light)")
    p.set_defaults(handler=_synth)

    p = sub.add_parser("train", help="fine-tune a CLIP image encoder")
    p.add_argument("--config", type=Path)
    p.add_argument("--data", type=Path, help="dataset root")
    p.add_argument("--splits", type=Path, help="splits folder of `handclip prepare`, or a folder tree")
    p.add_argument("--aspect", help="aspect key, or several separated by commas")
    p.add_argument("--aspects", help="several aspects for cross-aspect training, e.g. dorsal_r,palmar_r")
    p.add_argument("--out", type=Path, help="run folder")
    p.add_argument("--resume", type=Path, metavar="RUN", help="continue a run folder to its configured epochs")
    p.add_argument("--init-from", type=Path, metavar="CKPT", help="start from an earlier checkpoint's weights")
    _add_model_flags(p)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_train)

    p = sub.add_parser("evaluate", help="rank galleries with a checkpoint or a zero-shot CLIP")
    p.add_argument("--checkpoint", type=Path, action="append", help="repeat to fuse several models")
    p.add_argument("--zero-shot", action="store_true")
    _add_model_flags(p)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--splits", required=True, type=Path)
    p.add_argument("--aspect")
    p.add_argument("--all-aspects", action="store_true")
    p.add_argument("--query-aspect")
    p.add_argument("--gallery-aspect")
    p.add_argument("--protocol", choices=list(PROTOCOLS), default="single-aspect",
                   help="published: as MBA-Net/CLIP-HandID (11k gallery_all, HD with distractors, flip)")
    p.add_argument("--gallery-all", action="store_true", help="the published cross-aspect distractor gallery")
    p.add_argument("--num-splits", type=int)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--flip", action="store_true", help="add horizontally flipped images' features")
    p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking")
    p.add_argument("--k1", type=int, default=RERANK_K1)
    p.add_argument("--k2", type=int, default=RERANK_K2)
    p.add_argument("--lambda", dest="lambda_value", type=float, default=RERANK_LAMBDA)
    p.add_argument("--distance", choices=["cosine", "euclidean"], default="cosine")
    p.add_argument("--fusion", choices=["score", "feature"], default="score")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--show-query", action="append", metavar="IMAGE", help="also draw this query's ranking")
    p.add_argument("--save-scores", action="store_true", help="write every pair's score to scores_<i>.npz")
    p.add_argument("--allow-overlap", action="store_true",
                   help="evaluate even when a model was trained on a test subject (results.json says so)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_evaluate)

    p = sub.add_parser("calibrate", help="fit and validate a likelihood-ratio calibrator for a checkpoint")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--splits", required=True, type=Path)
    p.add_argument("--aspect", required=True)
    p.add_argument("--method", choices=["logistic", "isotonic", "kde"], default="logistic")
    p.add_argument("--calibration-splits", default="test", metavar="NAMES",
                   help="split names whose images form the pairs (comma-separated; people the model never saw)")
    p.add_argument("--folds", type=int, default=5, help="subject-disjoint folds of the validation")
    p.add_argument("--seed", type=int, default=0, help="how subjects are dealt into folds")
    p.add_argument("--out", required=True, type=Path, metavar="CAL_DIR")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_calibrate)

    p = sub.add_parser("compare", help="likelihood ratios of a questioned hand photo against references")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--calibration", required=True, type=Path, metavar="CAL_DIR")
    p.add_argument("questioned", type=Path, metavar="QUESTIONED")
    p.add_argument("references", type=Path, nargs="+", metavar="REFERENCE")
    p.add_argument("--out", required=True, type=Path, metavar="CASE_DIR")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_compare)

    p = sub.add_parser("demo", help="synthesise hands; evaluate a random-init, a pretrained (zero-shot) and a "
                                     "fine-tuned tiny model")
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--quick", action="store_true", help="smaller data and fewer epochs (tests)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_demo)

    p = sub.add_parser("bench", help="measure model, loader and end-to-end throughput")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--splits", type=Path, required=True)
    p.add_argument("--aspect", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=20)
    _add_model_flags(p)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.set_defaults(handler=_bench)

    p = sub.add_parser("benchmark", help="train and evaluate every aspect under the published protocol: "
                                         "leaderboard.json/.md beside the published results")
    p.add_argument("--config", type=Path, required=True, help="the preset every aspect trains with")
    p.add_argument("--data-11k", type=Path, metavar="ROOT", help="11k Hands root (HandInfo.csv, Hands/)")
    p.add_argument("--data-hd", type=Path, metavar="ROOT", help="HK PolyU HD root ('Original Images')")
    p.add_argument("--out", type=Path, required=True, help="benchmark folder (a second call resumes it)")
    p.add_argument("--aspects", dest="benchmark_aspects", metavar="A,B,...",
                   help="default: the four 11k aspects, and hd with --data-hd")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--num-splits", type=int, default=10, help="query/gallery splits to prepare and evaluate")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_benchmark)

    p = sub.add_parser("cache", help="decoded-image cache")
    cache_sub = p.add_subparsers(dest="cache_command", required=True)
    c = cache_sub.add_parser("build", help="decode every image of the splits once into the cache")
    c.add_argument("--data", type=Path, required=True)
    c.add_argument("--splits", type=Path, required=True)
    c.add_argument("--aspect", action="append", help="default: every aspect in the splits folder")
    c.add_argument("--size", type=int, default=256, help="stored side length")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(handler=_cache_build)
    p = sub.add_parser("gallery", help="the gallery of known hands (an SQLite file)")
    gallery_sub = p.add_subparsers(dest="gallery_command", required=True)
    g = gallery_sub.add_parser("add", help="enrol image files, folders or a split manifest")
    g.add_argument("--db", required=True, type=Path, help="gallery file (created if new)")
    g.add_argument("--checkpoint", required=True, type=Path)
    g.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="image files and folders")
    g.add_argument("--manifest", type=Path, metavar="CSV", help="image,identity,aspect[,metadata...] rows")
    g.add_argument("--data", type=Path, metavar="ROOT", help="dataset root the manifest's image paths start from")
    g.add_argument("--batch-size", type=int, default=64, help="images per encoding batch and transaction")
    g.add_argument("--device", default="cpu")
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(handler=_gallery_add)
    g = gallery_sub.add_parser("info", help="counts, the model, when it was made")
    g.add_argument("--db", required=True, type=Path)
    g.add_argument("--json", action="store_true")
    g.set_defaults(handler=_gallery_info)
    g = gallery_sub.add_parser("remove", help="remove an identity or one image")
    g.add_argument("--db", required=True, type=Path)
    what = g.add_mutually_exclusive_group(required=True)
    what.add_argument("--identity", metavar="ID")
    what.add_argument("--image", metavar="SHA256")
    g.set_defaults(handler=_gallery_remove)

    p = sub.add_parser("search", help="rank a gallery for questioned images")
    p.add_argument("--db", required=True, type=Path)
    p.add_argument("queries", nargs="+", type=Path, metavar="QUERY", help="image files and folders")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--calibration", type=Path, metavar="CAL_DIR", help="report log10 likelihood ratios")
    p.add_argument("--checkpoint", type=Path, help="the gallery's model file, if it has moved (same sha256)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--device", default="cpu")
    p.set_defaults(handler=_search)

    p = sub.add_parser("serve", help="a local web page to search the gallery")
    p.add_argument("--db", required=True, type=Path)
    p.add_argument("--calibration", type=Path, metavar="CAL_DIR", help="show likelihood ratios")
    p.add_argument("--host", default="127.0.0.1", help="any other address than 127.0.0.1 needs --token")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", help="required as 'Authorization: Bearer TOKEN' by every /api/ request")
    p.add_argument("--checkpoint", type=Path, help="the gallery's model file, if it has moved (same sha256)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(handler=_serve)



    p = sub.add_parser("explain", help="heatmaps of the regions that make two hand photos similar")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("query", type=Path)
    p.add_argument("candidate", type=Path)
    p.add_argument("--out", required=True, type=Path, help="folder for the overlays, maps and explanation.json")
    p.add_argument("--device", default="auto")
    p.set_defaults(handler=_explain)

    p = sub.add_parser("export", help="export a checkpoint to ONNX (uint8 images in, normalised features out)")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="the .onnx file; its metadata goes to OUT.json")
    p.add_argument("--opset", type=int, help="ONNX opset (default 18)")
    p.set_defaults(handler=_export)
    return parser


def _add_model_flags(p):
    p.add_argument("--arch", help="open_clip model name, or tiny-vit / tiny-rn")
    p.add_argument("--pretrained", help="open_clip tag, local weights file, or none")
    p.add_argument("--image-size", type=int)
    p.add_argument("--quick-gelu", type=_quick_gelu, metavar="{auto,true,false}",
                   help="QuickGELU activation (OpenAI's weights); auto decides from the weights' source")


def _quick_gelu(text: str):
    values = {"auto": "auto", "true": True, "false": False}
    if text.lower() not in values:
        raise argparse.ArgumentTypeError(f"{text!r} is not auto, true or false")
    return values[text.lower()]


def _version() -> str:
    from handclip import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except UserError as exc:
        print(f"handclip: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("handclip: interrupted", file=sys.stderr)
        return 130
    return 0
