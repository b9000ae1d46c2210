"""``results.html`` of ``handclip search``: each query beside its ranked candidates, one self-contained
page (thumbnails inline), so it can be handed on without the gallery's image folders."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image

from handclip.fileio import atomic_write_text

THUMBNAIL = 160
STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
section { margin-bottom: 2.5em; }
.row { display: flex; flex-wrap: wrap; gap: 0.8em; align-items: flex-start; }
figure { margin: 0; width: 170px; font-size: 0.85em; }
figure.query { border-right: 3px solid #333; padding-right: 0.8em; }
img { width: 160px; height: 160px; object-fit: contain; background: #f3f3f3; border: 1px solid #ccc; }
.missing { width: 160px; height: 160px; display: flex; align-items: center; justify-content: center;
           background: #f3f3f3; color: #999; border: 1px dashed #bbb; }
code { font-size: 0.85em; color: #555; }
"""


def write_results_html(path: str | Path, entries: list[dict], title: str = "handclip search") -> Path:
    path = Path(path)
    sections = [_section(entry) for entry in entries]
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n" + "\n".join(sections) + "\n</body>\n</html>\n")
    atomic_write_text(path, page)
    return path


def _section(entry: dict) -> str:
    query = (f'<figure class="query">{_thumbnail(entry["query"])}<figcaption><b>query</b><br>'
             f'{html.escape(Path(entry["query"]).name)}<br><code>{entry["sha256"][:12]}</code></figcaption></figure>')
    candidates = [_candidate(result) for result in entry["results"]]
    return (f'<section><h2>{html.escape(entry["query"])}</h2>\n<div class="row">{query}'
            + "".join(candidates) + "</div></section>")


def _candidate(result: dict) -> str:
    lines = [f'<b>#{result["rank"]}</b> {html.escape(str(result["identity"] or "no identity"))}',
             f'score {result["score"]:.4f}']
    if "log10_lr" in result:
        lines.append(f'log10 LR {result["log10_lr"]:+.2f}' + (f' ({html.escape(result["verbal"])})'
                                                             if result.get("verbal") else ""))
    lines.append(f'<code>{result["sha256"][:12]}</code>')
    return f'<figure>{_thumbnail(result["image"])}<figcaption>{"<br>".join(lines)}</figcaption></figure>'


def _thumbnail(path: str) -> str:
    try:
        with Image.open(path) as image:
            image.draft("RGB", (THUMBNAIL, THUMBNAIL))
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL, THUMBNAIL))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
    except (OSError, ValueError, Image.DecompressionBombError):
        return '<div class="missing">image not found</div>'
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="" src="data:image/jpeg;base64,{data}">'
