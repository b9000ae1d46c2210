"""``handclip benchmark``: the paper table in one command.

Prepares the splits where a dataset root has none, trains one model per aspect with one preset,
evaluates each under the published protocol, and writes ``leaderboard.json`` / ``leaderboard.md``
with the published results beside each aspect.

Layout of ``out``: ``runs/<aspect>/`` (training run folders), ``eval/<aspect>/`` (each evaluation,
swapped in whole once it is complete), ``benchmark.json`` (the settings and the seconds spent per
phase, accumulated over calls) and the leaderboard. A second call with the same settings resumes:
an aspect whose evaluation is present is not touched, an unfinished run continues from its last
epoch (``run_training(resume=...)``).
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from handclip.config import Config, config_to_dict, load_config
from handclip.data.manifests import count_splits
from handclip.data.prepare import PREPARERS
from handclip.engine.evaluation import EvaluateOptions, run_evaluate
from handclip.engine.run import RunFolder
from handclip.engine.train import run_training
from handclip.errors import UserError
from handclip.fileio import atomic_directory, atomic_write_json, atomic_write_text
from handclip.hand_datasets import ALL_ASPECTS, DATASET_OF_ASPECT, HAND_DATASETS, dataset_of
from handclip.published import AP_METRIC, PROTOCOLS, for_aspect

PROTOCOL = "published"
LEADERBOARD_METRICS = ("rank1", "mAP", "mAP_trapezoid", "mINP")
SETTINGS_FILE = "benchmark.json"


@dataclass
class BenchmarkOptions:
    config: Path
    out: Path
    data_11k: Path | None = None
    data_hd: Path | None = None
    aspects: list[str] | None = None  # default: the four 11k aspects with data_11k, and hd with data_hd
    overrides: dict = field(default_factory=dict)  # config keys, as --set gives them
    num_splits: int = 10
    device: str = "auto"
    quiet: bool = False


@dataclass(frozen=True)
class Dataset:
    name: str  # "11k" or "hd"
    root: Path

    @property
    def splits(self) -> Path:
        return self.root / "splits"


def run_benchmark(options: BenchmarkOptions) -> dict:
    """Train and evaluate every aspect (skipping finished ones); returns the leaderboard."""
    out = Path(options.out)
    if options.num_splits < 1:
        raise UserError(f"--num-splits {options.num_splits}: need at least 1 query/gallery split")
    config = load_config(options.config, options.overrides)
    if config.stages:
        raise UserError(f"{options.config}: benchmark trains one model per aspect; a preset with stages "
                        f"(sequential fine-tuning) cannot run here")
    aspects = _aspects(options)
    datasets = {aspect: _dataset(options, aspect) for aspect in aspects}
    used = sorted(set(datasets.values()), key=lambda d: d.name)
    clock = PhaseClock(out / SETTINGS_FILE, _check_settings(out, config, options, used))
    for dataset in used:
        if not dataset.splits.exists():
            with clock.phase(f"prepare_{dataset.name}"):
                PREPARERS[dataset.name](root=dataset.root, out=dataset.splits, seed=0, num_splits=options.num_splits)
    for aspect in aspects:
        _check_num_splits(datasets[aspect], aspect, options.num_splits)
    results = {aspect: _train_and_evaluate(aspect, datasets[aspect], config, options, clock) for aspect in aspects}
    leaderboard = {"rows": leaderboard_rows(results, f"handclip {Path(options.config).stem}", config.model.arch),
                   "seconds": clock.finish()}
    atomic_write_json(out / "leaderboard.json", leaderboard)
    atomic_write_text(out / "leaderboard.md", format_leaderboard(leaderboard))
    print(format_leaderboard(leaderboard))
    if not options.quiet:
        print(f"leaderboard: {out / 'leaderboard.json'}, {out / 'leaderboard.md'}")
    return leaderboard


# ---- inputs -------------------------------------------------------------------------------------------
def _roots(options: BenchmarkOptions) -> dict[str, Path | None]:
    """Dataset name (a key of HAND_DATASETS) → the root given for it."""
    return {"11k": options.data_11k, "hd": options.data_hd}


def _aspects(options: BenchmarkOptions) -> list[str]:
    if options.aspects is None:
        roots = _roots(options)
        aspects = [a for name, dataset in HAND_DATASETS.items() if roots[name] for a in dataset.aspects]
        if not aspects:
            raise UserError("benchmark needs --data-11k ROOT and/or --data-hd ROOT")
        return aspects
    unknown = [a for a in options.aspects if a not in ALL_ASPECTS]
    if unknown or not options.aspects:
        raise UserError(f"--aspects {','.join(options.aspects)}: expected some of {', '.join(ALL_ASPECTS)}")
    return list(dict.fromkeys(options.aspects))


def _dataset(options: BenchmarkOptions, aspect: str) -> Dataset:
    """The dataset root of ``aspect``, checked to hold that dataset before anything runs."""
    dataset = dataset_of(aspect)
    flag, layout = f"--data-{dataset.name}", " and ".join(f"'{e}'" for e in dataset.root_entries)
    root = _roots(options)[dataset.name]
    if root is None:
        raise UserError(f"--aspects {aspect} needs {flag} ROOT (a folder holding {layout})")
    root = Path(root)
    missing = [name for name in dataset.root_entries if not (root / name).exists()]
    if missing:
        raise UserError(f"{flag} {root}: no {' or '.join(missing)} there (not a download of {dataset.title})")
    return Dataset(dataset.name, root.resolve())


def _check_settings(out: Path, config: Config, options: BenchmarkOptions, datasets: list[Dataset]) -> dict:
    """What this benchmark measures; a folder of an earlier call must have measured the same."""
    resolved = config_to_dict(config)
    del resolved["data"]["aspects"], resolved["train"]["device"]  # per aspect / per machine
    settings = json.loads(json.dumps({"config": resolved, "protocol": PROTOCOL, "num_splits": options.num_splits,
                                      "data": {d.name: str(d.root) for d in datasets}}))
    previous = _read_json(out / SETTINGS_FILE).get("settings")
    if previous is not None:
        changed = [key for key in ("config", "protocol", "num_splits") if previous.get(key) != settings[key]]
        changed += [f"data {name}" for name, root in settings["data"].items()
                    if previous.get("data", {}).get(name, root) != root]
        if changed:
            raise UserError(f"{out}: holds a benchmark with other settings ({', '.join(changed)} differ); "
                            f"use another --out")
        settings["data"] = {**previous.get("data", {}), **settings["data"]}
    return settings


def _check_num_splits(dataset: Dataset, aspect: str, wanted: int) -> None:
    available = count_splits(dataset.splits, aspect)
    if available < wanted:
        raise UserError(f"{dataset.splits}: {available} query/gallery splits for '{aspect}', the benchmark "
                        f"needs {wanted} (move the folder away to let benchmark prepare it, or pass --num-splits)")


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path}: not valid JSON") from None


# ---- work ---------------------------------------------------------------------------------------------
def _train_and_evaluate(aspect: str, dataset: Dataset, config: Config, options: BenchmarkOptions,
                        clock: PhaseClock) -> dict:
    out = Path(options.out)
    run, evaluation = RunFolder(out / "runs" / aspect), out / "eval" / aspect
    results = evaluation / "results.json"
    if results.exists():
        return _read_json(results)
    with clock.phase(f"train_{aspect}"):
        if run.is_run():
            run_training(resume=run.root, overrides={"train.device": options.device}, quiet=options.quiet)
        else:
            overrides = dict(options.overrides, **{"data.aspects": [aspect], "train.device": options.device})
            run_training(config_path=options.config, overrides=overrides, data_root=dataset.root,
                         splits=dataset.splits, out=run.root, quiet=options.quiet)
    with clock.phase(f"evaluate_{aspect}"), atomic_directory(evaluation) as staging:
        result = run_evaluate(EvaluateOptions(data_root=dataset.root, splits=dataset.splits, out=staging, aspect=aspect,
                                     checkpoints=[run.best], protocol=PROTOCOL,
                                     num_splits=options.num_splits, batch_size=config.train.eval_batch_size,
                                     device=options.device, quiet=options.quiet))
    for part in ("encode", "after_encoding"):  # parts of evaluate_<aspect>, not added to the total again
        clock.note(f"evaluate_{aspect}_{part}", result["seconds"][part])
    return _read_json(results)


class PhaseClock:
    """Wall seconds per phase and in all, added up over every call of one benchmark folder and
    saved after each phase, so a killed call keeps the time of the phases it finished."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.settings = settings
        self.seconds: dict[str, float] = dict(_read_json(path).get("seconds", {}))
        self.mark = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        self._save()  # the settings are on disk before the phase leaves anything behind
        started = time.perf_counter()
        yield
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - started
        self.seconds["total"] = self.seconds.get("total", 0.0) + now - self.mark
        self.mark = now
        self._save()

    def note(self, name: str, seconds: float) -> None:
        """A part of a phase measured inside it (kept apart from the total)."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self._save()

    def finish(self) -> dict[str, float]:
        """Add the time since the last phase to the whole; return each phase, then the whole."""
        now = time.perf_counter()
        self.seconds["total"] = self.seconds.get("total", 0.0) + now - self.mark
        self.mark = now
        self._save()
        return {**{k: round(v, 1) for k, v in self.seconds.items() if k != "total"},
                "total": round(self.seconds["total"], 1)}

    def _save(self) -> None:
        atomic_write_json(self.path, {"settings": self.settings, "seconds": self.seconds})


# ---- the leaderboard ----------------------------------------------------------------------------------
def leaderboard_rows(results: dict[str, dict], method: str, backbone: str) -> list[dict]:
    """Per aspect: this benchmark's row (mean over splits, with std), then every published row of
    that aspect, whatever its protocol, its mAP under the key of its own AP definition."""
    rows = []
    for aspect, result in results.items():
        dataset = DATASET_OF_ASPECT[aspect]
        rows.append({"method": method, "backbone": backbone, "dataset": dataset, "aspect": aspect,
                     "protocol": result["protocol"], "published": False,
                     **{k: result["mean"][k] for k in LEADERBOARD_METRICS},
                     "std": {k: result["std"][k] for k in LEADERBOARD_METRICS},
                     "num_splits": result["num_splits"]})
        for paper in for_aspect(aspect):
            reported = {"rank1": paper.rank1, paper.map_metric: paper.mAP}
            rows.append({"method": paper.method, "backbone": paper.backbone, "dataset": paper.dataset,
                         "aspect": aspect, "protocol": paper.protocol, "published": True,
                         **{k: reported.get(k) for k in LEADERBOARD_METRICS},
                         "std": {k: None for k in LEADERBOARD_METRICS},
                         "trained_on": paper.trained_on, "source": paper.source})
    return rows


def format_leaderboard(leaderboard: dict) -> str:
    """Markdown: the table in percent (mean ± std over splits), the protocols, the seconds."""
    header = ["method", "backbone", "aspect", "protocol", "Rank-1", "mAP", "mAP (trapezoid)", "mINP"]
    lines = ["# handclip benchmark", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in leaderboard["rows"]:
        method = f"{row['method']} (paper)" if row["published"] else f"**{row['method']}**"
        cells = [method, row["backbone"], row["aspect"], row["protocol"]]
        cells += [_percent(row[k], row["std"][k]) for k in LEADERBOARD_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    used = sorted({row["protocol"] for row in leaderboard["rows"]})
    lines += ["", "Protocols (a paper's number is comparable only with a row of the same protocol, "
                  f"its mAP only with the column of its AP definition: {_ap_note()}):"]
    lines += [f"- `{name}`: {PROTOCOLS[name].description}" for name in used if name in PROTOCOLS]
    lines += ["", "| phase | seconds |", "|---|---|"]
    lines += [f"| {phase} | {seconds:.1f} |" for phase, seconds in leaderboard["seconds"].items()]
    return "\n".join(lines) + "\n"


def _ap_note() -> str:
    return ", ".join(f"{definition} AP → `{key}`" for definition, key in AP_METRIC.items())


def _percent(mean, std) -> str:
    if mean is None:
        return "—"
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if std is not None else f"{100 * mean:.2f}"
