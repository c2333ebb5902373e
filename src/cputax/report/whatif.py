"""A what-if experiment rendered: whatif.md and whatif.html from whatif.json, and the lines
`cputax whatif` prints when it is done. No judgment here: analysis.whatif made them."""

from __future__ import annotations

import html

from markdown_it import MarkdownIt

from cputax.report.format import ABSENT, number, table
from cputax.report.html import STYLE
from cputax.results.whatif import METRICS, Backtest, Claim, Effect, Placebo, Result, WhatIf
from cputax.rundir import WhatIfDir

__all__ = ["render_whatif", "summary_lines", "write_whatif_report"]


def _signed(v: float | None, digits: int = 2) -> str:
    return ABSENT if v is None else f"{v:+.{digits}f}"


def _effect(e: Effect) -> str:
    text = f"{_signed(e.value)} [{_signed(e.lo)}, {_signed(e.hi)}]"
    if e.pct is not None:
        text += f" = {_signed(e.pct, 1)}% [{_signed(e.pct_lo, 1)}, {_signed(e.pct_hi, 1)}]"
    return text


def _backtest(b: Backtest | None) -> str:
    if b is None:
        return "-"
    verdict = "holds" if b.holds else "**fails**"
    return (
        f"{number(b.predicted, 1)} vs {number(b.measured, 1)} "
        f"({_signed(b.error_pct, 1)}%, "
        f"interval ±{number(b.half_width, 1)}): {verdict}"
    )


def _result(r: Result) -> list[str]:
    lines = [
        f"### {r.component} in {r.scenario}",
        "",
        f"Its own time: {number(r.own_ms_per_request, 3)} ms per request unslowed. "
        "Added per request: "
        + ", ".join(
            f"k={k}: {number(p.added_ms, 3)} ms (own {number(p.own_ms, 3)} ms, "
            f"{number(p.calls, 1)} calls, {p.runs} runs)"
            for k, p in r.points.items()
        )
        + ".",
        "",
    ]
    rows = []
    for key, m in r.metrics.items():
        f = m.fit
        if f.linear is None:
            linear = "-"
        elif f.linear:
            linear = "yes"
        else:
            linear = "**no**" + ("" if f.curvature_t is None else f" (t={f.curvature_t:.1f})")
        rows.append(
            [
                f"{METRICS[key].label} ({METRICS[key].unit})",
                number(m.base, 1),
                f"{f.slope:+.3f} [{f.slope_lo:+.3f}, {f.slope_hi:+.3f}]",
                linear,
                _effect(m.faster_2x),
                _effect(m.free),
                _backtest(m.backtest),
            ]
        )
    lines.append(
        table(
            [
                "metric",
                "unslowed",
                "per added ms/request",
                "linear",
                "2x faster",
                "free",
                "back-test",
            ],
            rows,
        )
    )
    return lines


def _claim_cells(c: Claim) -> list[str]:
    if c.effect is None:
        return [c.claim, c.scenario, ABSENT, "-", c.sentence]
    e = c.effect
    return [
        c.claim,
        c.scenario,
        f"{_signed(e.pct, 1)}%",
        f"{_signed(e.pct_lo, 1)}% to {_signed(e.pct_hi, 1)}%",
        c.sentence,
    ]


def _placebo_line(scenario: str, p: Placebo) -> str:
    verdict = "within noise" if p.within_noise else "**an effect: do not conclude**"
    return (
        f"- {scenario}: {number(p.added_ms, 3)} ms added per request: {verdict} ("
        + "; ".join(
            f"{METRICS[k].label} {_signed(e.value)} [{_signed(e.lo)}, {_signed(e.hi)}]"
            for k, e in p.effects.items()
        )
        + ")"
    )


def render_whatif(w: WhatIf) -> str:
    info = w.info
    parts = [
        f"# cputax whatif: {', '.join(info.components)}",
        "",
        f"Server: {info.target or '?'} ({info.gpu or 'the model on this CPU'}); "
        f"profile {info.profile}; slowdowns k = "
        f"{', '.join(str(k) for k in info.slowdowns)}; repeat {info.repeat}; "
        f"CPU {info.cpu_model or 'unknown'}.",
        "",
        "Each component was slowed by k times its own time (CPU work, not a sleep, holding or "
        "releasing the GIL as the component does); each metric is fitted against the time added "
        "per request and extrapolated to the component being 2x faster and free. Intervals are "
        "95%. A negative change of a latency, or a positive one of throughput, is a gain.",
        "",
    ]
    for note in w.notes:
        parts.append(f"- **note:** {note}")
    parts += [
        "",
        "## The study's claims",
        "",
        table(
            ["claim", "scenario", "measured (free)", "interval", "what it means"],
            [_claim_cells(c) for c in w.claims],
        ),
        "",
        "## The slowdown's accuracy",
        "",
        table(
            ["component", "added (ms)", "asked, k x d (ms)", "error"],
            [
                [
                    c,
                    number(v.added_ms, 1),
                    number(v.target_ms, 1),
                    ABSENT if v.error_pct is None else _signed(v.error_pct, 1) + "%",
                ]
                for c, v in w.slowdown.items()
            ],
        ),
        "",
        "## Placebo",
        "",
    ]
    if not w.placebo:
        parts.append("No placebo was run.")
    parts += [_placebo_line(scenario, p) for scenario, p in w.placebo.items()]
    parts += ["", "## Per component", ""]
    for r in w.results:
        parts += _result(r) + [""]
    return "\n".join(parts) + "\n"


def write_whatif_report(exp: WhatIfDir, w: WhatIf) -> None:
    text = render_whatif(w)
    exp.report_md.write_text(text)
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    title = html.escape(f"cputax whatif: {exp.path.name}")
    exp.report_html.write_text(
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, "
        f"initial-scale=1'><title>{title}</title><style>{STYLE}</style></head>"
        f"<body>{body}</body></html>"
    )


def summary_lines(w: WhatIf) -> list[str]:
    """What `cputax whatif` prints at the end: notes, the placebo, each result's e2e p50 when
    the component is free."""
    lines = [f"note: {n}" for n in w.notes]
    for scenario, p in w.placebo.items():
        lines.append(
            f"placebo in {scenario}: "
            + ("within noise" if p.within_noise else "AN EFFECT: do not conclude")
        )
    for r in w.results:
        m = r.metrics.get("e2e_p50")
        if m:
            lines.append(f"{r.component} in {r.scenario}: free -> e2e p50 {_effect(m.free)}")
    return lines
