"""DIR/report.html: one self-contained file (figures embedded as base64 PNG, no external
CSS or script), so it can be mailed or attached to an issue; the same PNGs go to DIR/plots/.
"""

from __future__ import annotations

import base64
import html
from typing import Any

from markdown_it import MarkdownIt

from cputax.report import plots

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
code { background: #f6f6f6; padding: 0 0.2em; }
"""


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def render_figures(summary: dict[str, Any], corr: dict[str, Any], growth: list[dict[str, Any]]) -> dict[str, bytes]:
    """Every figure of the report, by file stem."""
    scenarios = summary["scenarios"]
    figures = {"decomposition": plots.decomposition_bars(scenarios),
               "http_overhead_vs_concurrency": plots.http_overhead_plot(scenarios, growth)}
    for s in corr.get("scenarios", []):
        figures[f"timeline_{_slug(s['name'])}"] = plots.timeline_plot(s["name"], s["timeline"])
    return {name: png for name, png in figures.items() if png}


def render_html(markdown_text: str, figures: dict[str, bytes], profiles: list[str], title: str) -> str:
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown_text)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body>"]
    top = [name for name in ("decomposition", "http_overhead_vs_concurrency") if name in figures]
    if top:
        parts.append("<h2>Figures</h2>" + "".join(_img(figures[n], n) for n in top))
    parts.append(body)
    timelines = [n for n in figures if n.startswith("timeline_")]
    if timelines:
        parts.append("<h2>Timelines</h2><p>Per scenario: GPU busy, server CPU, requests in flight by phase, "
                     "on one clock; red spans are stalls (GPU idle while requests were in flight).</p>")
        parts += [_img(figures[n], n) for n in timelines]
    parts.append("<h2>Flamegraphs</h2>")
    if profiles:
        parts.append("<ul>" + "".join(f'<li><a href="{html.escape(p)}">{html.escape(p)}</a></li>'
                                      for p in profiles) + "</ul>")
    else:
        parts.append("<p>none in this run (run with py-spy sampling to get them)</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
