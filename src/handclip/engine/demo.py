"""``handclip demo``: what handclip is for, on built-in synthetic hands, nothing downloaded.

synthesise → prepare the split protocol → evaluate a random-init tiny ResNet (``untrained``) →
evaluate the pretrained tiny ResNet that ships with handclip, zero-shot (``zero_shot``) → fine-tune it
with ID + triplet loss and a BNNeck (configs/demo-tiny.yaml) → evaluate it again (``trained``); each
evaluation under the single-aspect and the published protocol → summary.json and report.html with the
three side by side.

The pretrained backbone (handclip.weights.DEMO_BACKBONE) stands in for CLIP: it learned hands from
studio photos of other people, and is loaded through ``--pretrained FILE`` as CLIP weights are.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from handclip.config import load_config
from handclip.data.manifests import load_split
from handclip.data.prepare import format_summary, prepare_11k
from handclip.data.synth import synthesize
from handclip.engine.evaluation import METRIC_KEYS, EvaluateOptions, run_evaluate
from handclip.engine.train import run_training
from handclip.errors import UserError
from handclip.fileio import atomic_write_json
from handclip.weights import DEMO_BACKBONE, DEMO_BACKBONE_ARCH

ASPECT = "dorsal_r"
SIZE = (160, 120)
# (identities, photos per identity and aspect, fine-tuning epochs, splits): the full demo and the tests'
# quick one; epochs None: configs/demo-tiny.yaml's
FULL = dict(ids=100, per_aspect=8, epochs=None, num_splits=10)
QUICK = dict(ids=60, per_aspect=6, epochs=20, num_splits=3)
# single-aspect: the query's own aspect as gallery; published: the papers' (11k: both hands' galleries, flip)
PROTOCOLS = ("single-aspect", "published")
MODELS = {"untrained": "random init", "zero_shot": "pretrained, zero-shot", "trained": "fine-tuned"}
SHOWN_QUERIES = 4  # queries whose rankings the report shows for every model


def demo_config_path() -> Path:
    """configs/demo-tiny.yaml of the source tree the package runs from."""
    path = Path(__file__).resolve().parents[3] / "configs" / "demo-tiny.yaml"
    if not path.exists():
        raise UserError(f"{path}: the demo's config is missing; run the demo from a handclip source checkout")
    return path


def run_demo(out: str | Path = "demo_out", quick: bool = False, quiet: bool = False) -> dict:
    """Run the demo into ``out``; returns summary.json's content (mean metrics over the splits)."""
    out = Path(out)
    plan = dict(QUICK if quick else FULL)
    plan["epochs"] = plan["epochs"] or load_config(demo_config_path()).train.epochs
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    data, splits = out / "data", out / "data" / "splits"
    _say(quiet, f"[1/6] synthesising {plan['ids']} people's hands into {data}")
    synthesize(data, ids=plan["ids"], per_aspect=plan["per_aspect"], size=SIZE, seed=0)
    _say(quiet, "[2/6] preparing the published split protocol")
    _say(quiet, format_summary(prepare_11k(root=data, out=splits, seed=0, num_splits=plan["num_splits"])))
    shown = demo_queries(data, splits)
    pretrained = str(DEMO_BACKBONE)

    def evaluate(name: str, **model) -> dict:
        return evaluate_model(out / name, data, splits, shown, quiet, **model)

    _say(quiet, f"[3/6] evaluating a random-init {DEMO_BACKBONE_ARCH} (untrained)")
    results = {"untrained": evaluate("untrained", zero_shot=True, arch=DEMO_BACKBONE_ARCH, pretrained="none")}
    _say(quiet, f"[4/6] evaluating the pretrained {DEMO_BACKBONE_ARCH} zero-shot (--pretrained {pretrained})")
    results["zero_shot"] = evaluate("zero_shot", zero_shot=True, arch=DEMO_BACKBONE_ARCH, pretrained=pretrained)
    _say(quiet, f"[5/6] fine-tuning it for {plan['epochs']} epochs (ID + triplet, BNNeck: {demo_config_path().name})")
    run = run_training(config_path=demo_config_path(),
                       overrides={"train.epochs": plan["epochs"], "train.device": "cpu", "model.pretrained": pretrained},
                       data_root=data, splits=splits, out=out / "run", quiet=quiet)
    _say(quiet, "[6/6] evaluating the fine-tuned model")
    results["trained"] = evaluate("trained", checkpoints=[run / "checkpoints" / "best.pt"])

    summary = summarise_demo(results, plan, pretrained)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["cpu_seconds"] = round(_cpu_seconds() - cpu_started, 1)
    atomic_write_json(out / "summary.json", summary)
    _write_demo_report(out, results, shown)
    print("   ".join(f"{label}: rank-1 {100 * summary[name]['rank1']:.1f}%  mAP {100 * summary[name]['mAP']:.1f}%"
                       for name, label in MODELS.items()))
    print(f"report: {out / 'report.html'}")
    return summary


def evaluate_model(out: Path, data: Path, splits: Path, shown: list[str], quiet: bool, **model) -> dict:
    """One model of the demo under each of ``PROTOCOLS``: ``{protocol: run_evaluate's result}``, the
    first in ``out``, the others in ``out/<protocol>``. The first is the demo's headline (summary.json's
    top level, the report's pictures)."""
    common = dict(data_root=data, splits=splits, aspect=ASPECT, show_queries=shown, quiet=quiet, device="cpu")
    return {protocol: run_evaluate(EvaluateOptions(out=out if protocol == PROTOCOLS[0] else out / protocol,
                                                   protocol=protocol, **model, **common))
            for protocol in PROTOCOLS}


def demo_queries(data: Path, splits: Path) -> list[str]:
    """``SHOWN_QUERIES`` queries of split 0, of different people spread over the test set: the
    report shows how each model ranks the gallery for them. Chosen before any model runs."""
    first_of_each = {}
    for sample in load_split(data, splits, ASPECT, "query_0"):
        first_of_each.setdefault(sample.identity, sample.image)
    people = sorted(first_of_each)
    step = max(len(people) // SHOWN_QUERIES, 1)
    return [first_of_each[person] for person in people[::step][:SHOWN_QUERIES]]


def summarise_demo(results: dict, plan: dict, pretrained: str) -> dict:
    """summary.json: each model's mean metrics under the headline protocol at the top level
    (``untrained``, ``zero_shot``, ``trained``), every protocol's under ``protocols``."""
    headline = next(iter(results["trained"]))
    protocols = {protocol: {name: _means(by_protocol[protocol]) for name, by_protocol in results.items()}
                 for protocol in results["trained"]}
    return {**protocols[headline], "protocol": headline, "protocols": protocols,
            "arch": DEMO_BACKBONE_ARCH, "pretrained": Path(pretrained).name, "identities": plan["ids"],
            "epochs": plan["epochs"]}


def _means(result: dict) -> dict:
    return {k: result["mean"][k] for k in METRIC_KEYS + ("num_queries",)}


def _write_demo_report(out: Path, results: dict, shown: list[str]) -> None:
    """report.html: the three models in one table and one CMC plot, then the same queries as each
    ranks them, the fine-tuned model's worst queries and the fine-tuning history."""
    from handclip.report.html import write_report
    from handclip.report.plots import plot_cmc

    headline = next(iter(results["trained"]))
    cmc = plot_cmc({MODELS[name]: by_protocol[headline]["cmc"] for name, by_protocol in results.items()},
                   out / "cmc.png", title=f"CMC, {ASPECT} ({headline}, mean over splits)")
    images = [("CMC of the three models", cmc.relative_to(out))]
    images += [(f"The same {len(shown)} queries ranked by the {label} model (green: the right person)",
                f"{name}/chosen_queries.png") for name, label in MODELS.items()]
    images.append(("The fine-tuned model's worst queries", "trained/worst_queries.png"))
    table = [dict(by_protocol[protocol], aspect=MODELS[name])
             for protocol in results["trained"] for name, by_protocol in results.items()]
    history = sorted(str(p.relative_to(out)) for p in (out / "run" / "plots").glob("*.png"))
    write_report(out, title=f"handclip demo: a {DEMO_BACKBONE_ARCH} on synthetic hands, random init vs "
                            f"pretrained (zero-shot) vs fine-tuned", results=table,
                 images=[(caption, path) for caption, path in images if (out / path).exists()],
                 history_pngs=history, row_header="model")


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (image-decoding workers)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, flush=True)
