"""A sweep rendered: sweep.md and sweep.html (with a plot per knob) from the comparison
analysis.sweep made, and the lines `cputax sweep` prints at the end."""

from __future__ import annotations

import html

from markdown_it import MarkdownIt

from cputax.report import plots
from cputax.report.format import ABSENT, ms, table
from cputax.report.html import STYLE, image
from cputax.results.comparison import Delta
from cputax.results.sweep import METRICS, Claim, MetricValue, Sweep, SweepComparison
from cputax.rundir import SweepDir

__all__ = ["figures", "render_sweep", "summary_lines", "write_sweep_report"]

CATEGORY_ROWS = (
    "schedule",
    "kv_cache",
    "worker_wait",
    "model_execute",
    "tokenize",
    "detokenize",
    "sse",
    "http",
    "output_process",
    "ipc",
    "prefix_hash",
    "metrics",
    "metrics_scrape",
)
ROLES = ("api_server", "engine_core", "worker")


def _value(v: float | None, unit: str) -> str:
    """One decimal under 100, none above (report.format.ms's rule), "%" for a percentage."""
    return ABSENT if v is None else ms(v) + ("%" if unit == "%" else "")


def _delta(row: Delta, unit: str) -> str:
    if row.delta is None:
        return ABSENT
    text = f"{row.delta:+,.1f}" + (" pt" if unit == "%" else "")
    if row.within_spread is None:
        return text + " (no spread measure)"
    return text + (" (inside spread)" if row.within_spread else " (**beyond spread**)")


def _claims_table(claims: list[Claim]) -> str:
    rows = [[c.study, c.finding, c.spread or "-", c.sentence] for c in claims]
    return table(["The study claimed", "This server shows", "Spread", "What it means"], rows)


def _cell(metric: MetricValue | None, unit: str) -> str:
    if metric is None:
        return ABSENT
    value = _value(metric.value, unit)
    return value if metric.half_spread is None else value + f" ±{metric.half_spread:,.1f}"


def _comparison(comparison: SweepComparison) -> list[str]:
    configs = comparison.measured()
    base = comparison.baseline
    parts = []
    for name in comparison.scenario_names():
        header = ["Measurement", f"{base} (baseline)"] + [c.name for c in configs if c.name != base]
        rows = []
        for key, (label, unit, _) in METRICS.items():
            cells = []
            for c in configs:
                scenario = c.scenarios.get(name)
                value = _cell(scenario.metrics.get(key) if scenario else None, unit)
                row = comparison.delta(c.name, name, key) if c.name != base else None
                cells.append(value if row is None else f"{value}; {_delta(row, unit)}")
            if any(cell != ABSENT for cell in cells):
                rows.append([f"{label} ({unit})", *cells])
        parts += [f"### {name}", "", table(header, rows), ""]
        cat_rows = []
        for role in ROLES:
            for cat in CATEGORY_ROWS:
                found = [
                    (s.roles.get(role) if (s := c.scenarios.get(name)) else None) for c in configs
                ]
                values = [None if roles is None else roles.get(cat, 0.0) for roles in found]
                if any(v for v in values):
                    cat_rows.append([f"{role}: {cat}", *(_value(v, "") for v in values)])
        if cat_rows:
            parts += [
                "Server CPU by process and category (py-spy, % of one core, summed over "
                "the role's processes and threads):",
                "",
                table(["Where", *[c.name for c in configs]], cat_rows),
                "",
            ]
    return parts


def render_sweep(info: Sweep, comparison: SweepComparison) -> str:
    configs = comparison.configurations
    server = next((c.server for c in configs if c.server), None)
    parts = [
        f"# cputax sweep: {', '.join(info.varies)}",
        "",
        f"- profile: `{info.profile}`; {len(configs)} configurations x {info.repeat} "
        "repeat(s), the order alternating between repeats",
        f"- server: {info.target} {(server.version if server else None) or ''}"
        + (
            f", your command `{info.serve_cmd}`"
            if info.serve_cmd
            else " (the embedded target, started for each configuration)"
        ),
        f"- baseline: `{comparison.baseline}`; every other configuration is compared with it",
        *[f"- note on `{flag}`: {note}" for flag, note in info.notes.items()],
        "",
        "## What the study claimed, and what this server shows",
        "",
        _claims_table(comparison.claims),
        "",
        "## Configurations",
        "",
        table(
            ["Configuration", "Runs", "Outcome"],
            [
                [
                    c.name,
                    ", ".join(f"`{f}/`" for f in c.folders) or "-",
                    "; ".join(f"{s.status}: {s.message or ''}" for s in c.failed) or "measured",
                ]
                for c in configs
            ],
        ),
        "",
        "## The comparison",
        "",
        "Means over the repeats, ± half the run-to-run spread (the larger of the range over a "
        "run's batches, the 95% interval of a py-spy share and the range over the repeats); "
        "each delta against the baseline is marked inside or beyond that spread, the larger of "
        "the two configurations'. A delta inside the spread is not a measured difference.",
        "",
        *_comparison(comparison),
    ]
    return "\n".join(parts).rstrip() + "\n"


def figures(info: Sweep, comparison: SweepComparison) -> dict[str, bytes]:
    """A plot per knob: the measurement it should move, per scenario, each configuration side
    by side."""
    configs = comparison.measured()
    scenarios = comparison.scenario_names()
    out = {}
    for flag, key in info.moves.items():
        label, unit, _ = METRICS.get(key, (key, "", False))
        series = []
        for c in configs:
            found = [(s.metrics.get(key) if (s := c.scenarios.get(n)) else None) for n in scenarios]
            series.append(
                (
                    c.name,
                    [m.value if m else None for m in found],
                    [m.spread if m else None for m in found],
                )
            )
        png = plots.sweep_bars(f"{flag}: {label}", unit, scenarios, series)
        if png:
            out[f"sweep_{flag}"] = png
    return out


def write_sweep_report(sweep: SweepDir, comparison: SweepComparison) -> None:
    info = sweep.info()
    text = render_sweep(info, comparison)
    sweep.report_md.write_text(text)
    figs = figures(info, comparison)
    sweep.plots.mkdir(exist_ok=True)
    for name, png in figs.items():
        (sweep.plots / f"{name}.png").write_bytes(png)
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    title = f"cputax sweep: {sweep.path.name}"
    figures_html = "".join(f"<figure>{image(png, name)}</figure>" for name, png in figs.items())
    sweep.report_html.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' "
        f"content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{body}<h2>Figures</h2>"
        f"{figures_html or '<p>no knob with a plot in this sweep</p>'}</body></html>"
    )


def summary_lines(comparison: SweepComparison) -> list[str]:
    """What `cputax sweep` prints when it is done: each configuration's outcome, then each
    claim."""
    lines = []
    for c in comparison.configurations:
        state = (
            "measured"
            if c.scenarios
            else "; ".join(s.message or s.status for s in c.failed) or "no data"
        )
        lines.append(f"{c.name}: {state}")
    for claim in comparison.claims:
        lines.append(f"- {claim.study}: {claim.sentence}")
    return lines
