"""handclip search: the results files, the same ranking as evaluate, exact float16/faiss rankings,
the calibration hook, the audit log, and bad input."""
import json
import re
import sqlite3

import numpy as np
import pytest
import torch

import handclip
from handclip.cli import main
from handclip.engine.evaluation import EvaluateOptions, build_encoders, build_protocols, encode_all, fused_distance
from handclip.errors import UserError
from handclip.fileio import sha256_file
from handclip.forensic import verbal_equivalent
from handclip.gallery import EnrolItem, Gallery, enrol
from handclip.metrics import ranked_matches
from handclip.search.calibration import add_likelihood_ratios, load_calibration
from handclip.search.index import FeatureIndex, choose_backend, faiss_available


@pytest.fixture(scope="module")
def checkpoint(tiny_run):
    return tiny_run / "checkpoints" / "best.pt"


@pytest.fixture(scope="module")
def gallery_db(checkpoint, synth_root, splits_dir, tmp_path_factory):
    """dorsal_r's first gallery_all split (other aspects as distractors), enrolled in split order."""
    db = tmp_path_factory.mktemp("gallery") / "g.db"
    assert main(["gallery", "add", "--db", str(db), "--checkpoint", str(checkpoint), "--quiet", "--manifest",
                 str(splits_dir / "dorsal_r" / "gallery_0_all.csv"), "--data", str(synth_root)]) == 0
    return db


def search(db, out, *args):
    return main(["search", "--db", str(db), "--out", str(out), *map(str, args)])


def test_results_json_and_html(gallery_db, synth_root, splits_dir, tmp_path):
    queries = sorted((synth_root / "Hands").glob("*.jpg"))[:2]
    assert search(gallery_db, tmp_path / "out", *queries, "--top", 5) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results) == ["queries"] and len(results["queries"]) == 2
    with Gallery.open(gallery_db) as gallery:
        _, sha256s, features = next(gallery.feature_chunks())
        stored = gallery.records(sha256s)
        model_path = gallery.model.checkpoint
    query_features = handclip.load_model(model_path).encode(queries).numpy()
    for query, entry, feature in zip(queries, results["queries"], query_features):
        assert list(entry) == ["query", "sha256", "results"]
        assert entry["query"] == str(query) and entry["sha256"] == sha256_file(query)
        assert [r["rank"] for r in entry["results"]] == [1, 2, 3, 4, 5]
        for r in entry["results"]:
            assert list(r) == ["rank", "sha256", "image", "identity", "score"]
            record = stored[r["sha256"]]
            assert (r["image"], r["identity"]) == (record["path"], record["identity"])
        expected = np.sort(features @ feature)[::-1][:5]
        np.testing.assert_allclose([r["score"] for r in entry["results"]], expected, atol=1e-5)
    page = (tmp_path / "out" / "results.html").read_text()
    assert page.count("<section>") == 2 and len(re.findall(r'src="data:image/jpeg;base64,', page)) == 2 * 6
    assert all(r["sha256"][:12] in page for e in results["queries"] for r in e["results"])


def test_search_ranks_the_gallery_as_evaluate_does(checkpoint, synth_root, splits_dir, tmp_path):
    options = EvaluateOptions(data_root=synth_root, splits=splits_dir, out=tmp_path / "eval", checkpoints=[checkpoint],
                              aspect="dorsal_r", gallery_all=True, num_splits=1, device="cpu", quiet=True)
    protocol = build_protocols(options)[0]
    images = protocol.images()
    position = {s.path: i for i, s in enumerate(images)}
    features = encode_all(build_encoders(options)[0], images, options)
    queries, gallery = protocol.queries[0], protocol.galleries[0]
    dist = fused_distance([features], [position[s.path] for s in queries], [position[s.path] for s in gallery], options)
    order, _ = ranked_matches(dist, [protocol.key(s) for s in queries], [protocol.key(s) for s in gallery])

    db = tmp_path / "g.db"
    enrol(db, checkpoint, [EnrolItem(s.path, s.identity, s.aspect) for s in gallery])
    assert search(db, tmp_path / "out", *[s.path for s in queries], "--top", len(gallery)) == 0
    entries = json.loads((tmp_path / "out" / "results.json").read_text())["queries"]
    gallery_sha256 = [sha256_file(s.path) for s in gallery]
    for expected, entry, query_dist in zip(order, entries, dist):
        assert [r["sha256"] for r in entry["results"]] == [gallery_sha256[i] for i in expected]
        np.testing.assert_allclose([1 - r["score"] for r in entry["results"]], query_dist[expected], atol=1e-5)


def test_top_k_of_every_backend_is_the_exact_stable_ranking():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 48)).astype(np.float32)
    features = centres[rng.integers(0, 40, 3000)] + 0.3 * rng.standard_normal((3000, 48)).astype(np.float32)
    features[10] = features[2900]  # a tie: the earlier row must come first
    features = features / np.linalg.norm(features, axis=1, keepdims=True)
    queries = np.concatenate([features[[2900]], centres[:5] + 0.1 * rng.standard_normal((5, 48)).astype(np.float32)])
    backends = ["float32", "float16"] + (["faiss"] if faiss_available() else [])
    for backend in backends:
        index = FeatureIndex.from_matrix(features, backend=backend)
        stored = torch.nn.functional.normalize(torch.from_numpy(features), dim=1)
        stored = (stored if backend == "float32" else stored.half().float()).numpy()
        exact = torch.nn.functional.normalize(torch.from_numpy(queries), dim=1).numpy() @ stored.T
        rows, scores = index.search(queries, top=25)
        assert rows.shape == scores.shape == (len(queries), 25)
        for row, score, truth in zip(rows, scores, exact):
            expected = np.argsort(1 - truth, kind="stable")[:25]
            if backend == "faiss":  # its float16 codes round on their own, and it orders exact ties its own way
                np.testing.assert_allclose(score, truth[row], atol=1e-4)
                np.testing.assert_allclose(score, truth[expected], atol=1e-4)
            else:
                np.testing.assert_allclose(score, truth[expected], atol=1e-5)
                assert list(row) == list(expected), backend
        assert list(rows[0][:2]) in ([10, 2900], [2900, 10])
    assert list(FeatureIndex.from_matrix(features, "float32").search(queries[:1], 2)[0][0]) == [10, 2900]
    assert FeatureIndex.from_matrix(features[:3], "float32").search(queries, top=10)[0].shape == (6, 3)


def test_backend_by_gallery_size():
    assert choose_backend(100_000) == "float32"
    assert choose_backend(100_001) == "float16"
    assert choose_backend(1_000_000) == "float16"
    assert choose_backend(1_000_001) == ("faiss" if faiss_available() else "float16")
    assert choose_backend(5, "float16") == "float16"
    index = FeatureIndex(200_000, 8)
    assert index.backend == "float16" and index.nbytes == 200_000 * 8 * 2


def gallery_checkpoint_sha256(db):
    with Gallery.open(db) as gallery:
        return gallery.model.checkpoint_sha256


def test_calibrated_results_carry_log10_lr(gallery_db, synth_root, tmp_path, write_calibrator):
    assert add_likelihood_ratios([{"score": 0.7}], None) == [{"score": 0.7}]
    assert load_calibration(None, "any") is None
    calibrator = write_calibrator(tmp_path / "cal", gallery_checkpoint_sha256(gallery_db))
    query = sorted((synth_root / "Hands").glob("*.jpg"))[3]
    assert search(gallery_db, tmp_path / "out", query, "--calibration", tmp_path / "cal", "--top", 4) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())["queries"][0]["results"]
    expected = calibrator.llr(np.array([r["score"] for r in results]))
    assert [r["log10_lr"] for r in results] == pytest.approx(expected.tolist())
    assert [r["verbal"] for r in results] == [verbal_equivalent(v) for v in expected]
    assert "log10 LR" in (tmp_path / "out" / "results.html").read_text()


def test_calibration_of_another_model_is_refused(gallery_db, synth_root, tmp_path, capsys, write_calibrator):
    write_calibrator(tmp_path / "cal", "0" * 64)
    query = sorted((synth_root / "Hands").glob("*.jpg"))[0]
    assert search(gallery_db, tmp_path / "out", query, "--calibration", tmp_path / "cal") == 2
    err = capsys.readouterr().err
    assert "another checkpoint" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    with pytest.raises(UserError):
        load_calibration(tmp_path / "missing", "0" * 64)


def test_every_search_is_audited(gallery_db, synth_root, tmp_path):
    with Gallery.open(gallery_db) as gallery:
        before = len(gallery.audit())
    queries = sorted((synth_root / "Hands").glob("*.jpg"))[5:7]
    assert search(gallery_db, tmp_path / "out", *queries, "--top", 3) == 0
    entries = json.loads((tmp_path / "out" / "results.json").read_text())["queries"]
    with Gallery.open(gallery_db) as gallery:
        audit = gallery.audit()[before:]
    assert [a["query_sha256"] for a in audit] == [sha256_file(q) for q in queries]
    for logged, entry in zip(audit, entries):
        assert logged["results"] == [{k: r[k] for k in ("rank", "sha256", "score")} for r in entry["results"]]
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", logged["time"])


def test_bad_search_input_is_one_line_and_writes_nothing(gallery_db, checkpoint, synth_root, tmp_path, capsys):
    query = sorted((synth_root / "Hands").glob("*.jpg"))[0]
    not_image = tmp_path / "q.png"
    not_image.write_text("text")
    moved = tmp_path / "moved.db"
    moved.write_bytes(gallery_db.read_bytes())
    with sqlite3.connect(moved) as connection:
        connection.execute("UPDATE meta SET value = '/nowhere/best.pt' WHERE key = 'checkpoint'")
    connection.close()
    other = tmp_path / "other.pt"
    payload = torch.load(checkpoint, weights_only=True)
    payload["epoch"] += 1
    torch.save(payload, other)
    cases = [
        ([not_image], "not an image"),
        ([tmp_path / "empty_folder"], "no such file"),
        ([query, "--top", 0], "--top 0"),
        ([query, "--checkpoint", other], "another checkpoint"),
        ([tmp_path / "absent.db", query], "gallery not found"),
    ]
    for args, reason in cases:
        db = gallery_db if "absent.db" not in str(args[0]) else args.pop(0)
        capsys.readouterr()
        assert search(db, tmp_path / "out", *args) == 2, args
        err = capsys.readouterr().err
        assert reason in err and len(err.splitlines()) == 1, err
    capsys.readouterr()
    assert search(moved, tmp_path / "out", query) == 2
    assert "/nowhere/best.pt is not found; pass --checkpoint" in capsys.readouterr().err
    assert search(moved, tmp_path / "moved_out", query, "--checkpoint", checkpoint) == 0
    assert not (tmp_path / "out").exists() and not (tmp_path / "absent.db").exists()
