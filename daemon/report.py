"""`retraind report`: one self-contained HTML page about a model version (pictures inlined as data URIs, so
the page can be mailed or archived): accuracy per split, images and accuracy per label, the training curve,
the confusion matrix, and the most confident mistakes as thumbnails (the seed's
print_misclassified_test_images, with pictures)."""

from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path
from typing import Any

from PIL import UnidentifiedImageError

from daemon.atomic import write_atomic
from daemon.images import open_image
from daemon.registry import CONFUSION_MATRIX_FILE, TRAINING_CURVE_FILE, ModelVersion
from daemon.split import SPLITS
from daemon.status import percent, trust_lines

THUMBNAIL_PIXELS = 160

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } .sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.9em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img.plot { max-width: 100%; border: 1px solid #eee; }
.mistakes { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; width: 170px; font-size: 0.85em; }
figure img, figure .gone { width: 160px; height: 160px; object-fit: contain; background: #f4f4f4; display: block; }
figure .gone { display: flex; align-items: center; justify-content: center; color: #999; }
.path { word-break: break-all; } .wrong { color: #b00020; } .muted { color: #777; }
"""


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _thumbnail(path: Path) -> str | None:
    try:
        with open_image(path.read_bytes()) as image:
            image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=85)
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return _data_uri(buffer.getvalue(), "image/jpeg")


def _table(head: list[str], rows: list[list[str]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _plot(directory: Path, name: str, alt: str) -> str:
    path = directory / name
    if not path.is_file():
        return f'<p class="muted">No {html.escape(alt)} in this model version.</p>'
    return f'<img class="plot" alt="{html.escape(alt)}" src="{_data_uri(path.read_bytes(), "image/png")}">'


def _mistakes(mistakes: list[dict[str, Any]], classes_root: Path) -> str:
    if not mistakes:
        return '<p class="muted">No mistakes on the held-out images.</p>'
    figures = []
    for m in mistakes:
        src = _thumbnail(classes_root / m["path"])
        picture = (f'<img alt="{html.escape(m["path"])}" src="{src}">' if src
                   else '<div class="gone">file gone</div>')
        figures.append(
            f"<figure>{picture}<figcaption><b>{html.escape(m['true'])}</b> → "
            f'<span class="wrong">{html.escape(m["predicted"])}</span> ({float(m["score"]):.3f})<br>'
            f'<span class="muted path">{html.escape(m["path"])}</span></figcaption></figure>')
    legend = '<p class="muted">true label → <span class="wrong">predicted label</span> (its score)</p>'
    return f'{legend}<div class="mistakes">{"".join(figures)}</div>'


def _conflicts(conflicts: list[dict[str, Any]]) -> str:
    if not conflicts:
        return '<p class="muted">None: no two labels hold the same bytes.</p>'
    return _table(["labels", "files", "sha256"], [[", ".join(c["labels"]), " | ".join(c["paths"]), c["sha256"][:12]]
                                                  for c in conflicts])


def render(version: ModelVersion, classes_root: Path) -> str:
    m = version.metrics
    accuracy = m.get("accuracy", {})
    images: dict[str, dict[str, int]] = m.get("images", {})
    per_class = m.get("per_class_accuracy", {})
    split = m.get("confusion_split", "test")
    created = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(m["created"])) if "created" in m else "?"
    label_rows = [[label, *(str(images.get(label, {}).get(s, 0)) for s in SPLITS), percent(per_class.get(label))]
                  for label in version.labels]
    hyper = ", ".join(f"{k}={v}" for k, v in sorted(m.get("hyperparameters", {}).items()))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>retraind model {version.number}</title>
<style>{_CSS}</style></head><body>
<h1>retraind model {version.number}</h1>
<p class="sub">trained {html.escape(created)} on backbone <code>{html.escape(version.backbone)}</code>,
{len(version.labels)} labels, dataset <code>{html.escape(str(m.get("manifest_sha256", "?"))[:12])}</code></p>
<h2>Accuracy</h2>
{_table(["split", "accuracy"], [[s, percent(accuracy.get(s))] for s in SPLITS])}
<h2>Filing</h2>
{_table(["", ""], [[name, text] for name, text in trust_lines(m.get("trust"))])}
<h2>Labels</h2>
{_table(["label", *(f"{s} images" for s in SPLITS), f"accuracy ({split})"], label_rows)}
<h2>Training curve</h2>
{_plot(version.directory, TRAINING_CURVE_FILE, "training curve")}
<p class="muted">chosen fit (the last segment of the curve): {html.escape(hyper)}</p>
<h2>Confusion matrix</h2>
{_plot(version.directory, CONFUSION_MATRIX_FILE, "confusion matrix")}
<h2>Most confident mistakes ({html.escape(split)} split)</h2>
{_mistakes(m.get("mistakes", []), classes_root)}
<h2>The same image under two labels</h2>
{_conflicts(m.get("label_conflicts", []))}
</body></html>
"""


def write_report(version: ModelVersion, classes_root: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, render(version, classes_root).encode("utf-8"))
