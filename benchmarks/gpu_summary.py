"""The figures of one benchmarks/gpu.sh run, from its raw JSON: a table to copy into
docs/performance.md, and summary.json beside the raw files.

    python benchmarks/gpu_summary.py RESULTS_DIR

The whole-benchmark time is extrapolated (and labelled so): each aspect trained only a few epochs;
its 70-epoch time is (its training phase's seconds) / (epochs trained) x 70, which counts the
model build and the first epoch's cache decoding 70 times over, an overestimate.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

REFERENCE_EPOCHS = 70  # configs/vitb16-ce-triplet.yaml, as the published recipes


def bench_rows(results: Path) -> list[dict]:
    rows = []
    for path in sorted(results.glob("bench_*.json")):
        bench = json.loads(path.read_text())
        rows.append({"run": path.stem.removeprefix("bench_"), "batch": bench["settings"]["batch_size"],
                     "compile": bench["settings"]["compile"],
                     **{k: round(bench[k], 1) for k in ("model_only_img_s", "train_e2e_img_s", "jpeg_loader_img_s",
                                                        "cached_loader_img_s", "eval_extract_img_s")},
                     "e2e_over_model_only": round(bench["ratios"]["train_e2e_over_model_only"], 3)})
    return rows


def benchmark_rows(results: Path) -> list[dict]:
    rows = []
    for folder in sorted(results.glob("benchmark_*")):
        seconds = json.loads((folder / "benchmark.json").read_text())["seconds"]
        for aspect_folder in sorted((folder / "runs").iterdir()):
            aspect = aspect_folder.name
            with open(aspect_folder / "history.csv", newline="") as f:
                history = list(csv.DictReader(f))
            train = seconds[f"train_{aspect}"]
            rows.append({"aspect": aspect, "epochs": len(history),
                         "train_img_per_s": [round(float(r["img_per_s"]), 1) for r in history],
                         "train_s": round(train, 1),
                         "train_s_70_epochs_extrapolated": round(train / len(history) * REFERENCE_EPOCHS, 1),
                         **{key: round(seconds[f"evaluate_{aspect}{part}"], 2)
                            for key, part in (("evaluate_s", ""), ("encode_s", "_encode"),
                                              ("after_encoding_s", "_after_encoding"))}})
    return rows


def main(results: Path) -> None:
    benches, aspects = bench_rows(results), benchmark_rows(results)
    eleven_k = [a for a in aspects if a["aspect"] != "hd"]
    summary = {
        "bench": benches, "benchmark": aspects,
        "published_protocol_after_encoding_s_11k": round(sum(a["after_encoding_s"] for a in eleven_k), 2),
        "whole_benchmark_s_extrapolated": round(sum(a["train_s_70_epochs_extrapolated"] + a["evaluate_s"]
                                                    for a in aspects), 1),
        "whole_benchmark_aspects": [a["aspect"] for a in aspects],
    }
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("| run | batch | model only | train e2e | e2e / model | JPEG loader | cached loader | eval extract |")
    print("|---|---|---|---|---|---|---|---|")
    for r in benches:
        print(f"| {r['run']} | {r['batch']} | {r['model_only_img_s']:.0f} | {r['train_e2e_img_s']:.0f} | "
              f"{r['e2e_over_model_only']:.2f} | {r['jpeg_loader_img_s']:.0f} | {r['cached_loader_img_s']:.0f} | "
              f"{r['eval_extract_img_s']:.0f} |")
    print("\n| aspect | epochs | train img/s | train s | 70 epochs (extrapolated) s | evaluate s | encode s | "
          "after encoding s |")
    print("|---|---|---|---|---|---|---|---|")
    for a in aspects:
        print(f"| {a['aspect']} | {a['epochs']} | {'/'.join(f'{v:.0f}' for v in a['train_img_per_s'])} | "
              f"{a['train_s']} | {a['train_s_70_epochs_extrapolated']} | {a['evaluate_s']} | {a['encode_s']} | "
              f"{a['after_encoding_s']} |")
    print(f"\npublished protocol after encoding, 11k aspects x splits: {summary['published_protocol_after_encoding_s_11k']} s")
    print(f"whole benchmark ({', '.join(summary['whole_benchmark_aspects'])}), 70 epochs EXTRAPOLATED: "
          f"{summary['whole_benchmark_s_extrapolated']} s")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
