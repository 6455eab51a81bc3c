"""A self-contained HTML report: sections of text, PNG figures (next to the page) and tables."""

from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neurofm.utils import atomic_write_text

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:.4em 0}
.note{color:#555;font-size:.9em}code{background:#f4f4f4;padding:0 .2em}
"""


@dataclass
class Section:
    title: str
    text: str = ""
    images: list[str] = field(default_factory=list)  # paths relative to the report
    tables: list[list[dict[str, Any]]] = field(default_factory=list)
    note: str = ""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, list | tuple):
        return ", ".join(_fmt(x) for x in v)
    return html.escape(str(v)) if v is not None else "–"


def table_html(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(path: str | Path, title: str, sections: list[Section], intro: str = "") -> Path:
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
        f"<p class='note'>generated {time.strftime('%Y-%m-%d %H:%M')}</p>",
        f"<p>{intro}</p>" if intro else "",
    ]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{s.text}</p>")
        for img in s.images:
            parts.append(f"<img src='{html.escape(img)}' alt='{html.escape(s.title)}'>")
        for t in s.tables:
            parts.append(table_html(t))
        if s.note:
            parts.append(f"<p class='note'>{s.note}</p>")
    parts.append("</body></html>")
    return atomic_write_text(path, "\n".join(parts))
