"""handclip serve: the API (token, upload limits, images by sha256, same results as `handclip search`,
audit), the command's safety checks, and the page driven in headless Chromium."""
import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from handclip.cli import main
from handclip.data.manifests import load_split
from handclip.fileio import sha256_file
from handclip.gallery import Gallery
from handclip.search.searcher import Searcher
from handclip.serve.app import MAX_UPLOAD_BYTES, create_app

SRC = Path(__file__).resolve().parents[1] / "src"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def gallery_db(tiny_run, synth_root, splits_dir, tmp_path_factory):
    """dorsal_r's gallery_0_all: 8 identities, each with one photo of every aspect."""
    db = tmp_path_factory.mktemp("serve") / "g.db"
    assert main(["gallery", "add", "--db", str(db), "--checkpoint", str(tiny_run / "checkpoints" / "best.pt"),
                 "--quiet", "--manifest", str(splits_dir / "dorsal_r" / "gallery_0_all.csv"),
                 "--data", str(synth_root)]) == 0
    return db


@pytest.fixture(scope="module")
def searcher(gallery_db):
    searcher = Searcher(gallery_db)
    yield searcher
    searcher.close()


@pytest.fixture(scope="module")
def client(searcher):
    return TestClient(create_app(searcher))


@pytest.fixture(scope="module")
def query(synth_root, splits_dir):
    return load_split(synth_root, splits_dir, "dorsal_r", "query_0")[0]


def upload(client, data: bytes, name="q.jpg", top=None, headers=None):
    form = {"top": str(top)} if top is not None else {}
    return client.post("/api/search", files={"image": (name, data, "image/jpeg")}, data=form, headers=headers or {})


def test_search_gives_the_entry_of_handclip_search(client, gallery_db, query, tmp_path):
    assert main(["search", "--db", str(gallery_db), str(query.path), "--top", "7", "--out", str(tmp_path)]) == 0
    expected = json.loads((tmp_path / "results.json").read_text())["queries"][0]
    response = upload(client, query.path.read_bytes(), name=query.path.name, top=7)
    assert response.status_code == 200
    entry = response.json()
    assert entry == {**expected, "query": query.path.name}
    assert len(entry["results"]) == 7


def test_every_api_search_is_audited(client, gallery_db, query):
    with Gallery.open(gallery_db) as gallery:
        before = len(gallery.audit())
    entry = upload(client, query.path.read_bytes(), top=3).json()
    with Gallery.open(gallery_db) as gallery:
        audit = gallery.audit()
    assert len(audit) == before + 1
    assert audit[-1]["query_sha256"] == sha256_file(query.path) == entry["sha256"]
    assert [r["sha256"] for r in audit[-1]["results"]] == [r["sha256"] for r in entry["results"]]


def test_gallery_images_and_records_by_sha256_only(client, gallery_db, query, tmp_path, searcher):
    entry = upload(client, query.path.read_bytes(), top=1).json()
    best = entry["results"][0]
    image = client.get(f"/api/images/{best['sha256']}")
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert image.content == Path(best["image"]).read_bytes()
    record = client.get(f"/api/gallery/{best['sha256']}").json()
    assert (record["identity"], record["path"]) == (best["identity"], best["image"])
    assert record["aspect"] and record["enrolled"]
    not_ids = ["0" * 64, "../../etc/passwd", "%2e%2e%2fetc%2fpasswd", best["image"].lstrip("/"), best["sha256"].upper()]
    for bad in not_ids:
        assert client.get(f"/api/images/{bad}").status_code == 404, bad
        assert client.get(f"/api/gallery/{bad}").status_code == 404, bad


def test_explanations_draw_heatmaps_over_both_photos(client, query):
    entry = upload(client, query.path.read_bytes(), top=2).json()
    candidate = entry["results"][1]
    response = client.post("/api/explain", files={"image": ("q.jpg", query.path.read_bytes(), "image/jpeg")},
                           data={"candidate": candidate["sha256"]})
    assert response.status_code == 200
    explained = response.json()
    assert explained["score"] == pytest.approx(candidate["score"], abs=1e-4)
    for key, path in (("query_overlay", query.path), ("candidate_overlay", Path(candidate["image"]))):
        assert explained[key].startswith("data:image/jpeg;base64,")
        drawn = Image.open(io.BytesIO(base64.b64decode(explained[key].split(",", 1)[1]))).convert("RGB")
        plain = Image.open(path).convert("RGB")
        assert drawn.size == plain.size
        assert np.abs(np.asarray(drawn, float) - np.asarray(plain, float)).mean() > 2  # tinted where it matters
    not_image = client.post("/api/explain", files={"image": ("q.jpg", b"text", "image/jpeg")},
                            data={"candidate": candidate["sha256"]})
    assert not_image.status_code == 415
    unknown = client.post("/api/explain", files={"image": ("q.jpg", query.path.read_bytes(), "image/jpeg")},
                          data={"candidate": "0" * 64})
    assert unknown.status_code == 404


def test_a_changed_gallery_file_is_not_served(searcher, tmp_path):
    photo = tmp_path / "moving.jpg"
    Image.fromarray(np.full((40, 30, 3), 90, np.uint8)).save(photo)
    sha = sha256_file(photo)
    from handclip.gallery.store import GalleryRecord

    searcher.gallery.add([GalleryRecord(sha, str(photo), np.ones(searcher.gallery.model.feature_dim) / 8)])
    client = TestClient(create_app(searcher))
    try:
        assert client.get(f"/api/images/{sha}").status_code == 200
        Image.fromarray(np.full((40, 30, 3), 10, np.uint8)).save(photo)
        assert client.get(f"/api/images/{sha}").status_code == 410
        photo.unlink()
        assert client.get(f"/api/images/{sha}").status_code == 410
    finally:
        searcher.gallery.remove(sha256=sha)


def test_calibrated_server_reports_log10_lr(gallery_db, query, tmp_path, write_calibrator):
    with Gallery.open(gallery_db) as gallery:
        calibrator = write_calibrator(tmp_path / "cal", gallery.model.checkpoint_sha256)
    calibrated = Searcher(gallery_db, calibration=tmp_path / "cal")
    try:
        client = TestClient(create_app(calibrated))
        assert client.get("/api/info").json()["calibrated"] is True
        results = upload(client, query.path.read_bytes(), top=4).json()["results"]
        expected = calibrator.llr(np.array([r["score"] for r in results]))
        assert [r["log10_lr"] for r in results] == pytest.approx(expected.tolist())
    finally:
        calibrated.close()


def test_token_guards_the_api_not_the_page(searcher, query):
    client = TestClient(create_app(searcher, token="s3cret"))
    data = query.path.read_bytes()
    assert client.get("/api/info").status_code == 401
    assert client.get("/api/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/info", headers={"Authorization": "s3cret"}).status_code == 401
    assert upload(client, data).status_code == 401
    sha = upload(client, data, headers={"Authorization": "Bearer s3cret"}).json()["results"][0]["sha256"]
    assert client.get(f"/api/images/{sha}").status_code == 401
    assert client.get(f"/api/images/{sha}", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    info = client.get("/api/info", headers={"Authorization": "Bearer s3cret"}).json()
    assert info["images"] == 32 and info["calibrated"] is False
    assert client.get("/").status_code == 200 and "<title>handclip" in client.get("/").text
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/api/search", "/api/images/{sha256}"}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_uploads_are_limited_and_must_be_images(client, query, monkeypatch):
    jpeg = query.path.read_bytes()
    padded = jpeg + b"\0" * (MAX_UPLOAD_BYTES + 1 - len(jpeg))  # a JPEG with trailing bytes, 1 byte over
    assert upload(client, padded).status_code == 413
    assert upload(client, jpeg + b"\0" * (MAX_UPLOAD_BYTES + 2**20)).status_code == 413  # refused unread
    assert upload(client, jpeg + b"\0" * (MAX_UPLOAD_BYTES - len(jpeg) - 10)).status_code == 200

    text = upload(client, b"name,identity\nnot,an image\n", name="q.jpg")
    assert text.status_code == 415 and "not an image" in text.json()["detail"]
    gif = io.BytesIO()
    Image.new("RGB", (20, 20)).save(gif, format="GIF")
    assert upload(client, gif.getvalue(), name="q.gif").status_code == 415
    assert upload(client, jpeg[: len(jpeg) // 2]).status_code == 415  # truncated
    assert upload(client, jpeg, top=0).status_code == 422

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for side in (40, 100):  # over the limit; over twice the limit (Pillow's own DecompressionBombError)
        bomb = io.BytesIO()
        Image.new("L", (side, side)).save(bomb, format="PNG")
        response = upload(client, bomb.getvalue(), name="bomb.png")
        assert response.status_code == 413, side


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_refuses_a_busy_port_and_an_open_host_without_token(gallery_db, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["serve", "--db", str(gallery_db), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert "already in use" in err and str(port) in err and len(err.splitlines()) == 1
    assert main(["serve", "--db", str(gallery_db), "--host", "0.0.0.0", "--port", str(free_port())]) == 2
    assert "--token" in capsys.readouterr().err
    assert main(["serve", "--db", str(gallery_db) + ".absent", "--port", str(free_port())]) == 2
    assert "gallery not found" in capsys.readouterr().err


@pytest.fixture
def server(gallery_db):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "handclip", "serve", "--db", str(gallery_db), "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(url + "api/info", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"handclip serve did not start: {process.communicate()[0]}")
            time.sleep(0.3)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_the_page_finds_the_true_identity_and_compares_side_by_side(server, query, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)  # a loaded CI machine may take seconds for the first search
    profile = tempfile.mkdtemp(prefix="handclip-chromium-")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                profile, executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True,
                viewport={"width": 1280, "height": 900})
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(server)
            expect(page.locator("#gallery-info")).to_contain_text("32 images")
            page.set_input_files("#file", str(query.path))
            cards = page.locator("#results .card")
            expect(cards).to_have_count(20)
            identities = [cards.nth(i).get_attribute("data-identity") for i in range(20)]
            assert query.identity in identities
            match = page.locator(f'#results .card[data-identity="{query.identity}"]').first
            expect(match.locator("img")).to_have_attribute("src", re.compile(r"^blob:"))
            match.click()
            expect(page.locator("#compare")).to_be_visible()
            expect(page.locator("#compare-caption")).to_contain_text(query.identity)
            expect(page.locator("#compare-facts")).to_contain_text("Aspect")
            for image in ("#compare-query", "#compare-candidate"):
                page.wait_for_function(f"document.querySelector('{image}').naturalWidth > 0")
            page.check("#heatmaps")
            expect(page.locator("#compare-candidate")).to_have_attribute("src", re.compile(r"^data:image/jpeg"))
            expect(page.locator("#compare-query")).to_have_attribute("src", re.compile(r"^data:image/jpeg"))
            expect(page.locator("#heatmap-note")).to_be_visible()
            page.screenshot(path=str(tmp_path / "compare.png"))
            page.keyboard.press("Escape")
            expect(page.locator("#compare")).to_be_hidden()
            browser.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert (tmp_path / "compare.png").stat().st_size > 0
