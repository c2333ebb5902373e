"""DIR/report.html: one self-contained file (figures embedded as base64 PNG, no external
CSS or script), so it can be mailed or attached to an issue; the same PNGs go to DIR/plots/.
"""

from __future__ import annotations

import base64
import html

from markdown_it import MarkdownIt

from cputax.report import plots
from cputax.results.correlation import CorrelationResult
from cputax.results.summary import GrowthRow, Summary

# Readable from a phone (390 px) to a desktop: wide tables scroll inside themselves
# rather than pushing the page sideways, and figures take the column's width.
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 1.5em auto; \
padding: 0 1em; color: #222;
       line-height: 1.45; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; display: block; \
overflow-x: auto;
        max-width: 100%; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
figure { margin: 0.5em 0 1.5em; }
img { display: block; width: 100%; max-width: 1000px; height: auto; border: 1px solid #eee; }
code { background: #f6f6f6; padding: 0 0.2em; overflow-wrap: anywhere; }
p, li { overflow-wrap: anywhere; }
.summary { background: #f5f9ff; border-left: 4px solid #4a7bd0; padding: 0.6em 1em; }
"""


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def image(png: bytes, alt: str) -> str:
    """An <img> with the PNG embedded: the page needs no other file."""
    return (
        f'<img alt="{html.escape(alt)}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}">'
    )


def render_figures(
    summary: Summary, corr: CorrelationResult | None, growth: list[GrowthRow]
) -> dict[str, bytes]:
    """Every figure of the report, by file stem."""
    scenarios = summary.scenarios
    figures = {
        "decomposition": plots.decomposition_bars(scenarios),
        "http_overhead_vs_concurrency": plots.http_overhead_plot(scenarios, growth),
        "server_phases_split": plots.split_plot(scenarios),
    }
    for s in corr.scenarios if corr else []:
        if s.timeline is not None:
            figures[f"timeline_{_slug(s.name)}"] = plots.timeline_plot(s.name, s.timeline)
    return {name: png for name, png in figures.items() if png}


def _figure(png: bytes, name: str) -> str:
    return f"<figure>{image(png, name)}</figure>"


AFTER_DECOMPOSITION = "<h2>Client side</h2>"  # the study's figures go right after its table


def render_html(
    markdown_text: str, figures: dict[str, bytes], profiles: list[str], title: str
) -> str:
    """The page: the report's own order (title, the short answer, the study's table), the
    decomposition figures after that table, the timelines after the rest, then the links."""
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown_text)
    body = body.replace(
        "<p><strong>In short</strong>", '<p class="summary"><strong>In short</strong>', 1
    )
    top = "".join(
        _figure(figures[n], n)
        for n in ("decomposition", "http_overhead_vs_concurrency", "server_phases_split")
        if n in figures
    )
    if top and AFTER_DECOMPOSITION in body:
        body = body.replace(AFTER_DECOMPOSITION, top + AFTER_DECOMPOSITION, 1)
    elif top:
        body += top
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        body,
    ]
    timelines = [n for n in figures if n.startswith("timeline_")]
    if timelines:
        parts.append(
            "<h2>Timelines</h2><p>Per scenario: GPU busy, server CPU, requests in flight by phase, "
            "on one clock; red spans are stalls (GPU idle while requests were in flight).</p>"
        )
        parts += [_figure(figures[n], n) for n in timelines]
    parts.append("<h2>Flamegraphs</h2>")
    if profiles:
        parts.append(
            "<ul>"
            + "".join(f'<li><a href="{html.escape(p)}">{html.escape(p)}</a></li>' for p in profiles)
            + "</ul>"
        )
    else:
        parts.append("<p>none in this run (run with py-spy sampling to get them)</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
