"""handclip gallery add|info|remove: enrolment of files, folders and manifests, one checkpoint per
gallery, no image twice, whole batches after a SIGKILL, concurrent adders, and bad input."""
import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import handclip
from handclip.cli import main
from handclip.fileio import sha256_file
from handclip.gallery import Gallery

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def checkpoint(tiny_run):
    return tiny_run / "checkpoints" / "best.pt"


@pytest.fixture(scope="module")
def other_checkpoint(checkpoint, tmp_path_factory):
    """The same architecture with other weights: a different model by sha256."""
    payload = torch.load(checkpoint, weights_only=True)
    key = next(k for k, v in payload["model"].items() if v.is_floating_point())
    payload["model"][key] = payload["model"][key] + 0.01
    path = tmp_path_factory.mktemp("other") / "other.pt"
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def hands(synth_root):
    return sorted((synth_root / "Hands").glob("*.jpg"))


def add(db, checkpoint, *args):
    return main(["gallery", "add", "--db", str(db), "--checkpoint", str(checkpoint), "--quiet", *map(str, args)])


def info(db, capsys) -> dict:
    capsys.readouterr()
    assert main(["gallery", "info", "--db", str(db), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def rows(db) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute("SELECT sha256, path, identity, aspect, metadata FROM images ORDER BY id").fetchall()


def test_files_and_folders_are_enrolled_with_the_models_features(checkpoint, hands, tmp_path, capsys):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for hand in hands[4:7]:
        shutil.copy(hand, folder / "sub" / hand.name)
    (folder / "notes.txt").write_text("not an image, and not picked from a folder")
    db = tmp_path / "g.db"
    assert add(db, checkpoint, hands[0], hands[1], folder) == 0
    summary = info(db, capsys)
    assert summary["images"] == 5 and summary["identities"] == 0 and summary["unlabelled"] == 5
    assert summary["checkpoint_sha256"] == sha256_file(checkpoint)
    assert summary["checkpoint"] == str(checkpoint.resolve())
    assert summary["feature_dim"] == handclip.load_model(checkpoint).dim
    assert summary["preprocessing"]["image_size"] == handclip.load_model(checkpoint).image_size
    assert summary["created"] and summary["last_enrolled"]

    stored = rows(db)
    paths = [Path(p) for _, p, *_ in stored]
    assert paths == [hands[0], hands[1], *sorted((folder / "sub").glob("*.jpg"))]
    assert [sha for sha, *_ in stored] == [sha256_file(p) for p in paths]
    with Gallery.open(db) as gallery:
        (_, sha256s, features), = list(gallery.feature_chunks())
    expected = handclip.load_model(checkpoint).encode(paths).numpy()
    np.testing.assert_allclose(features, expected, atol=1e-5)
    assert main(["gallery", "info", "--db", str(db)]) == 0
    assert "5 (5 without identity)" in capsys.readouterr().out


def test_manifest_gives_identities_aspects_and_metadata(checkpoint, synth_root, splits_dir, tmp_path, capsys):
    source = splits_dir / "dorsal_r" / "gallery_0_all.csv"
    with open(source, newline="") as f:
        manifest_rows = list(csv.DictReader(f))
    manifest = tmp_path / "known.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "identity", "aspect", "case", "source"])
        for i, row in enumerate(manifest_rows):
            writer.writerow([row["image"], row["identity"], row["aspect"], f"case-{i % 3}", "seized phone"])
    db = tmp_path / "g.db"
    assert add(db, checkpoint, "--manifest", manifest, "--data", synth_root) == 0
    summary = info(db, capsys)
    assert summary["images"] == len(manifest_rows)
    assert summary["identities"] == len({r["identity"] for r in manifest_rows})
    assert summary["aspects"] == {a: sum(r["aspect"] == a for r in manifest_rows) for a in
                                  {r["aspect"] for r in manifest_rows}}
    stored = rows(db)
    for i, (row, (_, path, identity, aspect, metadata)) in enumerate(zip(manifest_rows, stored)):
        assert Path(path) == (synth_root / row["image"]).resolve()
        assert (identity, aspect) == (row["identity"], row["aspect"])
        assert json.loads(metadata) == {"case": f"case-{i % 3}", "source": "seized phone"}


def test_the_same_image_is_never_enrolled_twice(checkpoint, hands, tmp_path, capsys):
    copy = tmp_path / "renamed.jpg"
    shutil.copy(hands[0], copy)
    db = tmp_path / "g.db"
    assert add(db, checkpoint, hands[0], hands[0], copy, hands[1]) == 0
    assert "added 2 images, skipped 2" in capsys.readouterr().out
    assert add(db, checkpoint, hands[1], hands[2]) == 0
    assert "added 1 images, skipped 1" in capsys.readouterr().out
    assert [sha for sha, *_ in rows(db)] == [sha256_file(h) for h in hands[:3]]


def test_remove_by_identity_and_by_image(checkpoint, synth_root, splits_dir, tmp_path, capsys):
    db = tmp_path / "g.db"
    assert add(db, checkpoint, "--manifest", splits_dir / "dorsal_r" / "gallery_0_all.csv", "--data", synth_root) == 0
    stored = rows(db)
    identity = stored[0][2]
    with_identity = [r for r in stored if r[2] == identity]
    assert main(["gallery", "remove", "--db", str(db), "--identity", identity]) == 0
    assert {r[0] for r in rows(db)} == {r[0] for r in stored} - {r[0] for r in with_identity}
    target = rows(db)[0][0]
    assert main(["gallery", "remove", "--db", str(db), "--image", target]) == 0
    assert len(rows(db)) == len(stored) - len(with_identity) - 1 and target not in {r[0] for r in rows(db)}
    capsys.readouterr()
    assert main(["gallery", "remove", "--db", str(db), "--identity", identity]) == 2
    assert main(["gallery", "remove", "--db", str(db), "--image", target]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


def test_another_checkpoint_is_refused_and_nothing_is_written(checkpoint, other_checkpoint, hands, tmp_path, capsys):
    db = tmp_path / "g.db"
    assert add(db, checkpoint, hands[0]) == 0
    before = rows(db)
    capsys.readouterr()
    assert add(db, other_checkpoint, hands[1]) == 2
    err = capsys.readouterr().err
    assert err.startswith("handclip: error:") and "another checkpoint" in err and len(err.splitlines()) == 1
    assert rows(db) == before


def _bad_db(kind: str, path: Path) -> None:
    if kind == "corrupt":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "foreign":
        with sqlite3.connect(path) as connection:
            connection.execute("CREATE TABLE invoices (id INTEGER, amount REAL)")
            connection.execute("INSERT INTO invoices VALUES (1, 9.5)")
        connection.close()
    else:  # a gallery's header with its pages cut off
        shutil.copy(kind, path)
        with open(path, "r+b") as f:
            f.truncate(1024)


@pytest.mark.parametrize("kind", ["corrupt", "foreign", "truncated"])
def test_corrupt_or_foreign_db_is_one_line_and_left_untouched(kind, checkpoint, hands, tmp_path, capsys):
    db = tmp_path / "g.db"
    if kind == "truncated":
        good = tmp_path / "good.db"
        assert add(good, checkpoint, *hands[:8]) == 0
        with sqlite3.connect(good) as connection:  # fold the WAL into the file before cutting it
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        connection.close()
        kind = good
    _bad_db(kind, db)
    before = db.read_bytes()
    capsys.readouterr()
    commands = [["gallery", "info", "--db", str(db)],
                ["gallery", "add", "--db", str(db), "--checkpoint", str(checkpoint), "--quiet", str(hands[0])],
                ["gallery", "remove", "--db", str(db), "--identity", "x"],
                ["search", "--db", str(db), str(hands[0]), "--out", str(tmp_path / "out")]]
    for command in commands:
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert err.startswith(f"handclip: error: {db}") and len(err.splitlines()) == 1, err
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("g.db")) == ["g.db"]
    assert not (tmp_path / "out").exists()


def test_bad_input_writes_nothing(checkpoint, hands, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    text = tmp_path / "notes.jpg"
    text.write_text("a text file with an image's suffix")
    db = tmp_path / "g.db"
    cases = [(empty, "no image files"), (text, "not an image"), (tmp_path / "absent.jpg", "no such file")]
    for path, reason in cases:
        capsys.readouterr()
        assert add(db, checkpoint, hands[0], path) == 2
        err = capsys.readouterr().err
        assert reason in err and str(path) in err and len(err.splitlines()) == 1
        assert not db.exists()
    assert add(db, checkpoint, "--manifest", tmp_path / "absent.csv") == 2
    assert main(["gallery", "info", "--db", str(db)]) == 2
    assert not db.exists()


def _make_small_images(folder: Path, count: int) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(1)
    paths = [folder / f"hand_{i:04d}.png" for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).save(path)
    return paths


def _add_process(db, checkpoint, *paths, batch_size=2) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "CI": "1"}
    return subprocess.Popen([sys.executable, "-m", "handclip", "gallery", "add", "--db", str(db), "--checkpoint",
                             str(checkpoint), "--batch-size", str(batch_size), "--quiet", *map(str, paths)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _count(db) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as connection:
            return connection.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_sigkill_mid_add_leaves_whole_batches_and_a_rerun_completes(checkpoint, tmp_path):
    paths = _make_small_images(tmp_path / "many", 600)
    db = tmp_path / "g.db"
    process = _add_process(db, checkpoint, tmp_path / "many", batch_size=2)
    deadline = time.monotonic() + 300
    while _count(db) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = _count(db)
    assert 2 <= killed_at < len(paths) and killed_at % 2 == 0
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    connection.close()

    rerun = _add_process(db, checkpoint, tmp_path / "many", batch_size=2)
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    assert f"added {len(paths) - killed_at} images, skipped {killed_at}" in out
    stored = rows(db)
    assert [Path(p) for _, p, *_ in stored] == paths
    with Gallery.open(db) as gallery:
        (_, _, features), = list(gallery.feature_chunks(chunk=len(paths)))
    np.testing.assert_allclose(features, handclip.load_model(checkpoint).encode(paths).numpy(), atol=1e-5)


def test_two_processes_adding_at_once_both_succeed(checkpoint, tmp_path, capsys):
    paths = _make_small_images(tmp_path / "imgs", 120)
    db = tmp_path / "g.db"
    first = _add_process(db, checkpoint, *paths[:80], batch_size=4)
    second = _add_process(db, checkpoint, *paths[40:], batch_size=4)
    results = [p.communicate(timeout=600) for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], results
    added = [int(out.split()[1]) for out, _ in results]
    assert sum(added) == len(paths)
    assert sorted(sha for sha, *_ in rows(db)) == sorted(sha256_file(p) for p in paths)
    assert info(db, capsys)["images"] == len(paths)
