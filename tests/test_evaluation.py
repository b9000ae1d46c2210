"""handclip evaluate on synthetic data: zero-shot and trained, protocols, re-ranking, report, errors."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from handclip.cli import main
from handclip.data.manifests import load_split
from handclip.data.prepare import prepare_hd
from handclip.engine.evaluation import (EvaluateOptions, build_encoders, build_protocols, evaluate_protocol,
                                        uses_flip)
from handclip.errors import UserError
from handclip.metrics import evaluate_ranking, pairwise_distance
import handclip


def evaluate(tmp_path, synth_root, splits_dir, *args):
    out = tmp_path / "eval"
    code = main(["evaluate", "--data", str(synth_root), "--splits", str(splits_dir), "--out", str(out),
                 "--quiet", "--device", "cpu", *map(str, args)])
    return code, out


def test_trained_checkpoint_matches_an_independent_computation(tiny_run, synth_root, splits_dir, tmp_path):
    ckpt = tiny_run / "checkpoints" / "best.pt"
    code, out = evaluate(tmp_path, synth_root, splits_dir, "--checkpoint", ckpt, "--aspect", "dorsal_r")
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert result["aspect"] == "dorsal_r" and result["num_splits"] == 3 and len(result["splits"]) == 3
    model = handclip.load_model(ckpt)
    for i, split in enumerate(result["splits"]):
        query = load_split(synth_root, splits_dir, "dorsal_r", f"query_{i}")
        gallery = load_split(synth_root, splits_dir, "dorsal_r", f"gallery_{i}")
        dist = pairwise_distance(model.encode([s.path for s in query]), model.encode([s.path for s in gallery]))
        expected = evaluate_ranking(dist, [s.identity for s in query], [s.identity for s in gallery])
        for key in ("rank1", "rank5", "mAP", "mAP_trapezoid", "mINP"):
            assert split[key] == pytest.approx(expected[key], abs=1e-6), key  # the same pixels, the same features
        assert split["num_queries"] == len(query)
    mean_rank1 = np.mean([s["rank1"] for s in result["splits"]])
    assert result["mean"]["rank1"] == pytest.approx(mean_rank1)
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0] == "aspect,split,rank1,rank5,rank10,mAP,mAP_trapezoid,mINP,num_queries,eer,fnmr_at_fmr_1e-2,fnmr_at_fmr_1e-3,auc"
    assert len(csv_lines) == 1 + 3 + 2


def test_zero_shot_report_references_existing_pictures(synth_root, splits_dir, tmp_path):
    code, out = evaluate(tmp_path, synth_root, splits_dir, "--zero-shot", "--arch", "tiny-vit", "--pretrained",
                         "none", "--aspect", "palmar_l", "--num-splits", "2")
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert result["num_splits"] == 2
    assert all(0 <= result["mean"][k] <= 1 for k in ("rank1", "rank5", "rank10", "mAP", "mINP"))
    html = (out / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert {"cmc.png", "worst_queries.png"} <= set(sources)
    assert all((out / src).is_file() for src in sources)


def test_gallery_all_adds_distractors_of_other_aspects(tiny_run, synth_root, splits_dir, tmp_path):
    ckpt = tiny_run / "checkpoints" / "best.pt"
    _, plain = evaluate(tmp_path / "a", synth_root, splits_dir, "--checkpoint", ckpt, "--aspect", "dorsal_r")
    code, out = evaluate(tmp_path / "b", synth_root, splits_dir, "--checkpoint", ckpt, "--aspect", "dorsal_r",
                         "--gallery-all")
    assert code == 0
    single = json.loads((plain / "results.json").read_text())
    joint = json.loads((out / "results.json").read_text())
    assert joint["protocol"].startswith("gallery-all")
    # the same queries, a gallery with more (never matching) images: ranks can only get worse
    assert [s["num_queries"] for s in joint["splits"]] == [s["num_queries"] for s in single["splits"]]
    for a, b in zip(single["splits"], joint["splits"]):
        assert b["rank1"] <= a["rank1"] + 1e-9 and b["mAP"] <= a["mAP"] + 1e-9


def test_cross_aspect_uses_people_in_both_test_sets(tiny_run, synth_root, splits_dir, tmp_path):
    code, out = evaluate(tmp_path, synth_root, splits_dir, "--checkpoint", tiny_run / "checkpoints" / "best.pt",
                         "--query-aspect", "dorsal_r", "--gallery-aspect", "palmar_r")
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    shared = ({s.identity for s in load_split(synth_root, splits_dir, "dorsal_r", "test")}
              & {s.identity for s in load_split(synth_root, splits_dir, "palmar_r", "test")})
    query = [s for s in load_split(synth_root, splits_dir, "dorsal_r", "query_0") if s.identity in shared]
    assert result["aspect"] == "dorsal_r->palmar_r" and result["splits"][0]["num_queries"] == len(query)


def test_all_aspects_one_table(tiny_run, synth_root, splits_dir, tmp_path, capsys):
    code, out = evaluate(tmp_path, synth_root, splits_dir, "--checkpoint", tiny_run / "checkpoints" / "best.pt",
                         "--all-aspects", "--num-splits", "1")
    assert code == 0
    summary = json.loads((out / "results.json").read_text())
    assert [r["aspect"] for r in summary["aspects"]] == ["dorsal_r", "dorsal_l", "palmar_r", "palmar_l"]
    printed = capsys.readouterr().out
    assert all(a in printed for a in ("dorsal_r", "palmar_l", "mAP_trapezoid")) and "±" in printed
    html = (out / "report.html").read_text()
    assert all((out / src).is_file() for src in re.findall(r'<img src="([^"]+)"', html))


def test_rerank_changes_the_ranking_and_keeps_metrics_in_range(tiny_run, synth_root, splits_dir, tmp_path):
    base = dict(data_root=synth_root, splits=splits_dir, checkpoints=[tiny_run / "checkpoints" / "best.pt"],
                aspect="dorsal_r", quiet=True, device="cpu", num_splits=1)
    rankings = {}
    for rerank in (False, True):
        options = EvaluateOptions(out=tmp_path / str(rerank), rerank=rerank, rerank_k1=4, rerank_k2=2, **base)
        result, ranking = evaluate_protocol(build_protocols(options)[0], build_encoders(options), options)
        assert all(0 <= result["mean"][k] <= 1 for k in ("rank1", "mAP", "mINP"))
        rankings[rerank] = np.argsort(ranking.dist, axis=1, kind="stable")
    assert result["protocol"].endswith("rerank")
    assert (rankings[True] != rankings[False]).any()


def test_flip_and_euclidean_options(tiny_run, synth_root, splits_dir, tmp_path):
    code, out = evaluate(tmp_path, synth_root, splits_dir, "--checkpoint", tiny_run / "checkpoints" / "best.pt",
                         "--aspect", "dorsal_r", "--flip", "--distance", "euclidean", "--num-splits", "1",
                         "--show-query", load_split(synth_root, splits_dir, "dorsal_r", "query_0")[0].image)
    assert code == 0
    assert "flip" in json.loads((out / "results.json").read_text())["protocol"]
    assert (out / "chosen_queries.png").is_file()


@pytest.mark.parametrize("case", ["no-model", "missing-aspect", "bad-checkpoint", "corrupt-image",
                                  "too-many-splits", "wrong-query"])
def test_bad_input_exits_2_with_one_line(case, tiny_run, synth_root, splits_dir, tmp_path, capsys):
    ckpt = tiny_run / "checkpoints" / "best.pt"
    args = ["--checkpoint", ckpt, "--aspect", "dorsal_r"]
    data, expected = synth_root, None
    if case == "no-model":
        args, expected = ["--aspect", "dorsal_r"], "--checkpoint"
    elif case == "missing-aspect":
        args, expected = ["--checkpoint", ckpt, "--aspect", "hd"], "hd"
    elif case == "bad-checkpoint":
        (tmp_path / "x.pt").write_bytes(b"junk")
        args, expected = ["--checkpoint", tmp_path / "x.pt", "--aspect", "dorsal_r"], "x.pt"
    elif case == "corrupt-image":
        data = tmp_path / "data"
        shutil.copytree(synth_root, data, ignore=shutil.ignore_patterns("splits"))
        victim = load_split(synth_root, splits_dir, "dorsal_r", "query_0")[0].image
        (data / victim).write_bytes(b"\xff\xd8 broken")
        expected = Path(victim).name
    elif case == "too-many-splits":
        args, expected = args + ["--num-splits", "7"], "--num-splits"
    elif case == "wrong-query":
        args, expected = args + ["--show-query", "nope.jpg"], "nope.jpg"
    code = main(["evaluate", "--data", str(data), "--splits", str(splits_dir), "--out", str(tmp_path / "out"),
                 "--quiet", *map(str, args)])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and err.count("\n") == 1 and "Traceback" not in err


def test_all_queries_unmatched_is_explained(tiny_run, synth_root, splits_dir, tmp_path, capsys):
    splits = tmp_path / "splits"
    shutil.copytree(splits_dir, splits)
    gallery = splits / "dorsal_r" / "gallery_0.csv"
    lines = gallery.read_text().splitlines()
    gallery.write_text("\n".join([lines[0]] + [re.sub(r",(\d+),", ",9999999,", line) for line in lines[1:]]) + "\n")
    code = main(["evaluate", "--data", str(synth_root), "--splits", str(splits), "--out", str(tmp_path / "o"),
                 "--quiet", "--checkpoint", str(tiny_run / "checkpoints" / "best.pt"), "--aspect", "dorsal_r",
                 "--num-splits", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "unmatched" in err


def test_zero_shot_random_init_is_reproducible(synth_root, splits_dir, tmp_path):
    import torch

    results = []
    for i in range(2):
        torch.manual_seed(i)  # as if in two processes: the global RNG must not matter
        results.append(evaluate(tmp_path / str(i), synth_root, splits_dir, "--zero-shot", "--arch", "tiny-vit",
                                "--pretrained", "none", "--aspect", "dorsal_r", "--num-splits", "1")[1])
    first, second = (json.loads((out / "results.json").read_text()) for out in results)
    assert first["splits"] == second["splits"]


# ---- the published protocol ------------------------------------------------------------------------
def test_published_protocol_is_gallery_all_with_flip(tiny_run, synth_root, splits_dir, tmp_path):
    ckpt = tiny_run / "checkpoints" / "best.pt"
    code, out = evaluate(tmp_path / "p", synth_root, splits_dir, "--checkpoint", ckpt, "--aspect", "dorsal_r",
                         "--protocol", "published", "--num-splits", "2")
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert result["protocol"] == "published"
    model = handclip.load_model(ckpt)
    for i, split in enumerate(result["splits"]):
        query = load_split(synth_root, splits_dir, "dorsal_r", f"query_{i}")
        gallery = load_split(synth_root, splits_dir, "dorsal_r", f"gallery_{i}_all")
        assert {s.aspect for s in gallery} == {"dorsal_r", "dorsal_l", "palmar_r", "palmar_l"}
        dist = pairwise_distance(model.encode([s.path for s in query], flip=True),
                                 model.encode([s.path for s in gallery], flip=True))
        expected = evaluate_ranking(dist, [(s.identity, s.aspect) for s in query],
                                    [(s.identity, s.aspect) for s in gallery])
        for key in ("rank1", "mAP", "mAP_trapezoid", "mINP"):
            assert split[key] == pytest.approx(expected[key], abs=1e-6), key  # the same pixels, the same features
    # the same numbers as the single-aspect options spelled out, under another name
    code, manual = evaluate(tmp_path / "m", synth_root, splits_dir, "--checkpoint", ckpt, "--aspect", "dorsal_r",
                            "--gallery-all", "--flip", "--num-splits", "2")
    spelled_out = json.loads((manual / "results.json").read_text())
    assert spelled_out["protocol"] == "gallery-all+flip" and spelled_out["splits"] == result["splits"]
    report = (out / "report.html").read_text()
    assert "Published results under the same protocol" in report and "MBA-Net" in report


def test_published_protocol_ranks_hd_in_its_gallery_with_distractors(hd_root, synth_root, splits_dir, tmp_path):
    hd_splits = tmp_path / "hd_splits"
    prepare_hd(root=hd_root, out=hd_splits, seed=0, num_splits=2)
    for protocol, flip in (("published", True), ("single-aspect", False)):
        options = EvaluateOptions(data_root=hd_root, splits=hd_splits, out=tmp_path, zero_shot=True,
                                  aspect="hd", protocol=protocol)
        (hd,) = build_protocols(options)
        assert uses_flip(options) is flip and not hd.match_on_aspect
        for i, gallery in enumerate(hd.galleries):
            assert gallery == load_split(hd_root, hd_splits, "hd", f"gallery_{i}")
            assert {"1502", "1503"} <= {s.identity for s in gallery}  # the 502-712 distractors
        published_11k = build_protocols(EvaluateOptions(data_root=synth_root, splits=splits_dir, out=tmp_path,
                                                        zero_shot=True, all_aspects=True, protocol=protocol))
        for p in published_11k:
            gallery_name = "gallery_0_all" if protocol == "published" else "gallery_0"
            assert p.galleries[0] == load_split(synth_root, splits_dir, p.aspect, gallery_name)


def test_protocol_errors(synth_root, splits_dir, tmp_path, capsys):
    code, _ = evaluate(tmp_path, synth_root, splits_dir, "--zero-shot", "--arch", "tiny-vit", "--pretrained", "none",
                       "--protocol", "published", "--query-aspect", "dorsal_r", "--gallery-aspect", "palmar_r")
    err = capsys.readouterr().err
    assert code == 2 and "--protocol published" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:
        evaluate(tmp_path, synth_root, splits_dir, "--zero-shot", "--aspect", "dorsal_r", "--protocol", "papers")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("handclip: error: evaluate: argument --protocol") and "'published'" in err
    with pytest.raises(UserError, match="papers"):
        build_protocols(EvaluateOptions(data_root=synth_root, splits=splits_dir, out=tmp_path, aspect="dorsal_r",
                                        protocol="papers"))
