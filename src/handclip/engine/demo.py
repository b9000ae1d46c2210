"""``handclip demo``: the whole pipeline on built-in synthetic hands, nothing downloaded.

synthesise → prepare splits → evaluate the untrained tiny model → train tiny-cpu → evaluate again
→ summary.json and report.html.
"""
from __future__ import annotations

import time
from pathlib import Path

from handclip.data.prepare import format_summary, prepare_11k
from handclip.data.synth import synthesize
from handclip.engine.evaluation import METRIC_KEYS, EvaluateOptions, run_evaluate
from handclip.engine.train import run_training
from handclip.errors import UserError
from handclip.fileio import atomic_write_json

ASPECT = "dorsal_r"
# (identities, photos per identity and aspect, epochs, splits): full demo and the tests' quick one
FULL = dict(ids=100, per_aspect=8, epochs=40, num_splits=10)
QUICK = dict(ids=24, per_aspect=4, epochs=8, num_splits=3)


def demo_config_path() -> Path:
    """configs/tiny-cpu.yaml of the source tree the package runs from."""
    path = Path(__file__).resolve().parents[3] / "configs" / "tiny-cpu.yaml"
    if not path.exists():
        raise UserError(f"{path}: the demo's config is missing; run the demo from a handclip source checkout")
    return path


def run_demo(out: str | Path = "demo_out", quick: bool = False, quiet: bool = False) -> dict:
    out = Path(out)
    plan = QUICK if quick else FULL
    started = time.perf_counter()
    data = out / "data"
    _say(quiet, f"[1/5] synthesising {plan['ids']} hands into {data}")
    synthesize(data, ids=plan["ids"], per_aspect=plan["per_aspect"], size=(160, 120), seed=0)
    _say(quiet, "[2/5] preparing the published split protocol")
    splits = data / "splits"
    summary = prepare_11k(root=data, out=splits, seed=0, num_splits=plan["num_splits"])
    _say(quiet, format_summary(summary))

    common = dict(data_root=data, splits=splits, aspect=ASPECT, quiet=quiet, device="cpu")
    _say(quiet, "[3/5] evaluating the untrained tiny model")
    untrained = run_evaluate(EvaluateOptions(out=out / "untrained", zero_shot=True, arch="tiny-vit",
                                             pretrained="none", **common))
    _say(quiet, f"[4/5] training tiny-vit for {plan['epochs']} epochs")
    run = run_training(config_path=demo_config_path(), overrides={"train.epochs": plan["epochs"],
                                                                  "train.device": "cpu"},
                       data_root=data, splits=splits, out=out / "run", quiet=quiet)
    _say(quiet, "[5/5] evaluating the trained model")
    trained = run_evaluate(EvaluateOptions(out=out / "trained", checkpoints=[run / "checkpoints" / "best.pt"],
                                           **common))
    result = {"untrained": _means(untrained), "trained": _means(trained),
              "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_json(out / "summary.json", result)
    _write_demo_report(out, untrained, trained)
    print(f"untrained rank-1 {100 * result['untrained']['rank1']:.1f}%  mAP {100 * result['untrained']['mAP']:.1f}%"
          f"  →  trained rank-1 {100 * result['trained']['rank1']:.1f}%  mAP {100 * result['trained']['mAP']:.1f}%")
    print(f"report: {out / 'report.html'}")
    return result


def _means(result: dict) -> dict:
    return {k: result["mean"][k] for k in METRIC_KEYS + ("num_queries",)}


def _write_demo_report(out: Path, untrained: dict, trained: dict) -> None:
    from handclip.report.html import write_report

    images = [("Trained: worst queries", "trained/worst_queries.png"),
              ("Untrained: worst queries", "untrained/worst_queries.png"),
              ("CMC, trained", "trained/cmc.png"), ("CMC, untrained", "untrained/cmc.png")]
    history = sorted(str(p.relative_to(out)) for p in (out / "run" / "plots").glob("*.png"))
    write_report(out, title="handclip demo: untrained vs trained tiny-vit on synthetic hands",
                 results=[dict(untrained, aspect="untrained"), dict(trained, aspect="trained")],
                 images=[(c, p) for c, p in images if (out / p).exists()], missed=[], history_pngs=history)


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, flush=True)
