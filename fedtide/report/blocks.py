"""A report's blocks (headings, text, tables, figures) and their two renderings, HTML and Markdown.

The report is built once as a list of blocks and rendered twice, so the HTML and the
Markdown always say the same thing. The HTML embeds its PNGs as data URIs and links
nothing outside itself: it can be mailed or attached to a paper's supplement and opens offline.
"""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

FIGURES_DIR = "figures"  # beside the report: each figure as a PNG file, which the Markdown links to


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class TableBlock:
    columns: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Image:
    name: str
    caption: str
    png: bytes


Block = Heading | Text | TableBlock | Image


def render_html(blocks: list[Block]) -> str:
    body = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            body.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, TableBlock):
            head = "".join(f"<th>{html.escape(c)}</th>" for c in block.columns)
            rows = "".join(
                "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in block.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        else:
            data = base64.b64encode(block.png).decode()
            caption = html.escape(block.caption)
            body.append(
                f'<figure><img alt="{caption}" src="data:image/png;base64,{data}"><figcaption>{caption}'
                "</figcaption></figure>"
            )
    title = html.escape(next(b.text for b in blocks if isinstance(b, Heading)))
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def render_markdown(blocks: list[Block]) -> str:
    lines = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Text):
            lines += [block.text, ""]
        elif isinstance(block, TableBlock):
            lines.append("| " + " | ".join(block.columns) + " |")
            lines.append("|" + "---|" * len(block.columns))
            lines += ["| " + " | ".join(row) + " |" for row in block.rows]
            lines.append("")
        else:
            lines += [f"![{block.caption}]({FIGURES_DIR}/{block.name})", ""]
    return "\n".join(lines)


def png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` whole, so an interrupted report never leaves a half-written file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
    "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f0f0f0}"
    "td:first-child,th:first-child{text-align:left}"
    "figure{margin:1em 0}img{max-width:100%}figcaption{font-size:12px;color:#555}"
    "h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;margin-top:1.6em}"
)
