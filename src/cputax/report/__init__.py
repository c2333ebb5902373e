"""Rendering only: the Results of analysis become report.md, report.html and plots/*.png.

Nothing here computes a measurement or reads a run's records: `render` turns Results
into markdown, `write_report` writes the report's own files through RunDir.
"""

from __future__ import annotations

from pathlib import Path

from cputax.records import Results
from cputax.report.agentic import agentic_section
from cputax.report.emulated import emulated_section
from cputax.report.html import render_figures, render_html
from cputax.report.markdown import render_report
from cputax.report.nodes import nodes_section
from cputax.report.profiling import profiling_section
from cputax.report.server_phases import server_phases_section
from cputax.report.telemetry import render_telemetry
from cputax.rundir import RunDir

__all__ = ["render", "write_report"]


def render(results: Results) -> str:
    """report.md's text."""
    sections = [
        server_phases_section(results.summary),
        agentic_section(results.summary, results.info),
        render_telemetry(results.correlation) if results.correlation else None,
        emulated_section(results.summary, results.correlation),
        profiling_section(results),
        nodes_section(results),
    ]
    return render_report(results.summary, results.info, [s for s in sections if s], results.growth)


def write_report(run: RunDir, results: Results) -> Path:
    """Write report.md, report.html and plots/*.png; the HTML's path."""
    markdown = render(results)
    run.report_md.write_text(markdown)
    figures = render_figures(results.summary, results.correlation, results.growth)
    run.plots.mkdir(exist_ok=True)
    for name, png in figures.items():
        (run.plots / f"{name}.png").write_bytes(png)
    run.report_html.write_text(
        render_html(markdown, figures, results.views, f"cputax report: {results.name}")
    )
    return run.report_html
