"""The local web page's server: a FastAPI app over one :class:`~handclip.search.Searcher`.

Safety: every ``/api/`` request needs ``Authorization: Bearer TOKEN`` when the app has a token (the
page itself and the OpenAPI docs hold no data and load without it); uploads are limited to
:data:`MAX_UPLOAD_BYTES`, must decode with Pillow as one of :data:`IMAGE_FORMATS` within Pillow's
decompression-bomb pixel limit; gallery images are served by sha256 only, and only while the file on
disk still has that sha256; every search is appended to the gallery's audit table.
"""
from __future__ import annotations

import base64
import hashlib
import io
import mimetypes
import re
import secrets
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError

from handclip.data.images import load_resized, read_image
from handclip.errors import UserError
from handclip.search.searcher import Query, Searcher

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries around the one file field
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")
STATIC = Path(__file__).parent / "static"
SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_TOP = 500
OVERLAY_SIZE = 900  # longest side of the heatmap pictures sent to the page


class UploadRejected(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def check_upload(data: bytes) -> None:
    """An upload must be at most :data:`MAX_UPLOAD_BYTES` and an image of an accepted format within
    Pillow's decompression-bomb pixel limit (read from its header); :class:`UploadRejected` otherwise."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadRejected(413, f"the image is larger than {MAX_UPLOAD_BYTES // 2**20} MB")
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            format_, (width, height) = image.format, image.size
    except Image.DecompressionBombError as exc:
        raise UploadRejected(413, f"refused as a decompression bomb ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise UploadRejected(415, f"not an image ({', '.join(IMAGE_FORMATS)} accepted)") from None
    if format_ not in IMAGE_FORMATS:
        raise UploadRejected(415, f"{format_} images are not accepted ({', '.join(IMAGE_FORMATS)} are)")
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        raise UploadRejected(413, f"{width}x{height} pixels is over the limit of {Image.MAX_IMAGE_PIXELS}")


def decode_upload(data: bytes, size: int | None = None):
    """A checked upload decoded: the stored form (``size × size × 3`` uint8, exactly as a file on disk
    would be decoded for search) or, without ``size``, the whole RGB photo (PIL)."""
    check_upload(data)
    try:
        return load_resized(io.BytesIO(data), size) if size else read_image(io.BytesIO(data))
    except UserError:
        raise UploadRejected(415, "the image cannot be decoded (truncated or corrupt)") from None


def image_data_url(image: Image.Image, longest: int = OVERLAY_SIZE) -> str:
    image = image.copy()
    image.thumbnail((longest, longest))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def create_app(searcher: Searcher, token: str | None = None):
    """The FastAPI app: ``/`` (the page), ``/api/info``, ``POST /api/search``, ``/api/images/{sha256}``,
    ``/api/gallery/{sha256}``, ``POST /api/explain``; OpenAPI docs at ``/docs``."""
    def authorised(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or wrong token (Authorization: Bearer TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="handclip", version="1",
                  description="Search a gallery of known hands with a questioned photo (handclip serve).")
    api = APIRouter(prefix="/api", dependencies=[Depends(authorised)])

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        """Refuse an oversize upload before it is read (the file field is checked exactly later)."""
        declared = request.headers.get("content-length")
        if request.method == "POST" and declared is None:
            return JSONResponse({"detail": "a Content-Length is required"}, status_code=411)
        if declared is not None and int(declared) > MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD:
            return JSONResponse({"detail": f"the upload is larger than {MAX_UPLOAD_BYTES // 2**20} MB"},
                                status_code=413)
        return await call_next(request)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @api.get("/info")
    def info() -> dict:
        """The gallery's counts and model, and whether scores are calibrated."""
        with searcher.lock:
            summary = searcher.gallery.info()
        keys = ("images", "identities", "checkpoint_sha256", "feature_dim", "created", "last_enrolled")
        return {**{k: summary[k] for k in keys}, "calibrated": searcher.calibrated,
                "max_upload_bytes": MAX_UPLOAD_BYTES}

    @api.post("/search")
    def search(image: UploadFile = File(..., description="the questioned photo"),
               top: int = Form(20, ge=1, le=MAX_TOP)) -> dict:
        """One entry of ``handclip search``'s ``queries`` list for the uploaded photo."""
        data = image.file.read(MAX_UPLOAD_BYTES + 1)
        try:
            pixels = decode_upload(data, searcher.encoder.image_size)
        except UploadRejected as exc:
            raise HTTPException(exc.status, exc.detail) from None
        query = Query(image.filename or "upload", hashlib.sha256(data).hexdigest(), pixels)
        try:
            return searcher.search([query], top)[0]
        except UserError as exc:
            raise HTTPException(409, str(exc)) from None

    def record(sha256: str) -> dict:
        if not SHA256.match(sha256):
            raise HTTPException(404, "not a sha256 (64 lower-case hex digits)")
        with searcher.lock:
            found = searcher.gallery.records([sha256]).get(sha256)
        if found is None:
            raise HTTPException(404, "no such image in the gallery")
        return found

    @api.get("/gallery/{sha256}")
    def gallery_record(sha256: str) -> dict:
        """An enrolled image's identity, aspect, metadata, path and enrolment time."""
        return record(sha256)

    def enrolled_file(sha256: str) -> tuple[Path, bytes]:
        """An enrolled image's path and bytes, only while the file still is that image."""
        path = Path(record(sha256)["path"])
        try:
            data = path.read_bytes()
        except OSError:
            raise HTTPException(410, "the enrolled file is no longer there") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise HTTPException(410, "the enrolled file has changed since enrolment")
        return path, data

    @api.get("/images/{sha256}", response_class=Response)
    def gallery_image(sha256: str):
        """An enrolled image, by its sha256."""
        path, data = enrolled_file(sha256)
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    @api.post("/explain")
    def explain(image: UploadFile = File(..., description="the questioned photo"),
                candidate: str = Form(..., description="sha256 of a gallery image")) -> dict:
        """Heatmaps of the regions of the query and of a candidate that raise their similarity,
        drawn over both photos (JPEG data URLs), and the pair's score."""
        from handclip.explain import explain_pair, overlay

        try:
            query = decode_upload(image.file.read(MAX_UPLOAD_BYTES + 1))
        except UploadRejected as exc:
            raise HTTPException(exc.status, exc.detail) from None
        candidate_image = read_image(io.BytesIO(enrolled_file(candidate)[1]))
        with searcher.lock:  # the explanation hooks into the shared model for one pass
            result = explain_pair(searcher.encoder, query, candidate_image)
        return {"score": result["score"], "query_overlay": image_data_url(overlay(query, result["heatmap_a"])),
                "candidate_overlay": image_data_url(overlay(candidate_image, result["heatmap_b"]))}

    app.include_router(api)
    return app
