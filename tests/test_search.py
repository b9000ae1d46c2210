"""handclip search: the results files, the same ranking as evaluate, exact float16/int8 rankings,
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
from handclip.search.index import FLOAT16_BOUND, FeatureIndex, choose_backend, faiss_available
from handclip.search.searcher import gallery_index


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


BACKENDS = ["float32", "float16"] + (["int8"] if faiss_available() else [])


def assert_exact_ranking(features, queries, rows, scores, top):
    """Against an independent float64 computation: the scores are the rows' cosines (to float32
    rounding), best first (by evaluate's float32 distance), nothing better left out, no row twice."""
    unit = lambda x: x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)  # noqa: E731
    exact = unit(queries) @ unit(features).T
    assert rows.shape == scores.shape == (len(queries), min(top, len(features)))
    for row, score, truth in zip(rows, scores, exact):
        assert len(set(row.tolist())) == len(row)
        np.testing.assert_allclose(score, truth[row], rtol=0, atol=1e-6)
        assert np.all(np.diff(np.float32(1) - score) >= 0)  # evaluate's float32 distance, ascending
        left_out = np.delete(truth, row)
        assert left_out.size == 0 or left_out.max() <= score[-1] + 1e-6


def clustered(rng, rows, dim, clusters=40, spread=0.3):
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    features = centres[rng.integers(0, clusters, rows)] + spread * rng.standard_normal((rows, dim)).astype(np.float32)
    return centres, features


@pytest.mark.parametrize("dim", [48, 64])  # faiss scans int8 queries when dim % 16 == 0, float ones otherwise
def test_every_backend_gives_the_exact_stable_ranking(dim):
    rng = np.random.default_rng(dim)
    centres, features = clustered(rng, 3000, dim)
    features[10] = features[2900]  # a tie: the earlier row must come first
    features[20] = features[2900]  # and another
    queries = np.concatenate([features[[2900]], centres[:5] + 0.1 * rng.standard_normal((5, dim)).astype(np.float32)])
    for top in (1, 25, 2000, 3000, 5000):
        results = {backend: FeatureIndex.from_matrix(features, backend).search(queries, top) for backend in BACKENDS}
        for backend, (rows, scores) in results.items():
            assert_exact_ranking(features, queries, rows, scores, top)
            # the compact scans only pick candidates: the ranks and float32 scores are the exact ones, bit for bit
            np.testing.assert_array_equal(rows, results["float32"][0])
            np.testing.assert_array_equal(scores, results["float32"][1])
        assert results["float32"][0][0][:3].tolist() == [10, 20, 2900][:top]


def test_exact_when_later_rows_exceed_the_first_rows_range_and_scores_crowd():
    """int8 codes take their scales from the first chunk: later, larger rows are clipped (and always
    rescored); near-duplicates crowd the top within the scan's error, so its shortlist must grow."""
    rng = np.random.default_rng(1)
    _, spread = clustered(rng, 2000, 64, clusters=20)
    spread[:, :8] *= 0.05  # the first chunk barely uses 8 dimensions, which the crowd uses fully
    crowd = rng.standard_normal(64).astype(np.float32) + 0.002 * rng.standard_normal((2500, 64)).astype(np.float32)
    features = np.concatenate([spread, crowd])
    queries = np.concatenate([crowd[:2], spread[5:7]])
    chunks = [(len(features), [str(i)] * 1000, features[i:i + 1000]) for i in range(0, len(features), 1000)]
    exact = FeatureIndex.from_matrix(features, "float32").search(queries, 30)
    assert_exact_ranking(features, queries, *exact, 30)
    for backend in BACKENDS[1:]:
        _, index = FeatureIndex.from_chunks(chunks, 64, backend, exact_rows=lambda rows: features[rows])
        for got, want in zip(index.search(queries, 30), exact):
            np.testing.assert_array_equal(got, want)
    if faiss_available():
        _, index = FeatureIndex.from_chunks(chunks, 64, "int8", exact_rows=lambda rows: features[rows])
        assert len(index._scan.outliers) > 0  # the case this test is about did happen


def test_float16_scan_error_is_within_its_bound():
    rng = np.random.default_rng(2)
    for dim in (48, 512):
        gallery = torch.nn.functional.normalize(torch.randn(20_000, dim), dim=1)
        gallery[:5000] = torch.nn.functional.normalize(torch.rand(5000, dim), dim=1)  # all terms of one sign
        query = torch.nn.functional.normalize(torch.from_numpy(rng.random(dim, dtype=np.float32)), dim=0)
        scanned = torch.mv(gallery.half(), query.half()).double()
        assert (scanned - gallery.double() @ query.double()).abs().max() <= FLOAT16_BOUND


def test_compact_backends_rescore_from_the_gallery_file(gallery_db):
    with Gallery.open(gallery_db) as gallery:
        sha256s, exact = gallery_index(gallery, "float32")
        _, stored, features = next(gallery.feature_chunks())
        np.testing.assert_array_equal(gallery.features_of([stored[3], stored[0]]), features[[3, 0]])
        queries = features[:4] + 0.05 * np.random.default_rng(3).standard_normal(features[:4].shape, dtype=np.float32)
        for backend in BACKENDS[1:]:
            compact_sha256s, index = gallery_index(gallery, backend)
            assert compact_sha256s == sha256s and index.backend == backend
            for got, want in zip(index.search(queries, 7), exact.search(queries, 7)):
                np.testing.assert_array_equal(got, want)
        with pytest.raises(UserError, match="removed during the search"):
            gallery.features_of([stored[0], "0" * 64])


def test_backend_by_gallery_size():
    assert choose_backend(100_000) == "float32"
    assert choose_backend(100_001) == ("int8" if faiss_available() else "float16")
    assert choose_backend(5_000_000) == ("int8" if faiss_available() else "float16")
    assert choose_backend(5, "float16") == "float16"
    with pytest.raises(ValueError, match="exact_rows"):
        FeatureIndex(200_000, 8)
    index = FeatureIndex(200_000, 8, "float16", exact_rows=lambda rows: None)
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
