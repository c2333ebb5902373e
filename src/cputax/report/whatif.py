"""A what-if experiment rendered: whatif.md and whatif.html from whatif.json, and the lines
`cputax whatif` prints when it is done. No judgment here: analysis.whatif made them."""

from __future__ import annotations

import html
from typing import Any

from markdown_it import MarkdownIt

from cputax.report.format import ABSENT, number, table
from cputax.report.html import STYLE
from cputax.rundir import WhatIfDir
from cputax.whatif import WhatIf

__all__ = ["render_whatif", "summary_lines", "write_whatif_report"]

LABELS = {
    "throughput": ("output tokens/s", "tok/s"),
    "ttft_p50": ("TTFT p50", "ms"),
    "ttft_p99": ("TTFT p99", "ms"),
    "itl_p50": ("ITL p50", "ms"),
    "itl_p99": ("ITL p99", "ms"),
    "e2e_p50": ("e2e p50", "ms"),
    "e2e_p99": ("e2e p99", "ms"),
}


def _signed(v: float | None, digits: int = 2) -> str:
    return ABSENT if v is None else f"{v:+.{digits}f}"


def _effect(e: dict[str, Any]) -> str:
    text = f"{_signed(e['value'])} [{_signed(e['lo'])}, {_signed(e['hi'])}]"
    if e.get("pct") is not None:
        text += f" = {_signed(e['pct'], 1)}% [{_signed(e['pct_lo'], 1)}, {_signed(e['pct_hi'], 1)}]"
    return text


def _backtest(b: dict[str, Any] | None) -> str:
    if b is None:
        return "-"
    verdict = "holds" if b["holds"] else "**fails**"
    return (
        f"{number(b['predicted'], 1)} vs {number(b['measured'], 1)} "
        f"({_signed(b['error_pct'], 1)}%, "
        f"interval ±{number(b['half_width'], 1)}): {verdict}"
    )


def _result(r: dict[str, Any]) -> list[str]:
    lines = [
        f"### {r['component']} in {r['scenario']}",
        "",
        f"Its own time: {number(r['own_ms_per_request'], 3)} ms per request unslowed. "
        "Added per request: "
        + ", ".join(
            f"k={k}: {number(p['added_ms'], 3)} ms (own {number(p['own_ms'], 3)} ms, "
            f"{number(p['calls'], 1)} calls, {p['runs']} runs)"
            for k, p in r["points"].items()
        )
        + ".",
        "",
    ]
    rows = []
    for key, m in r["metrics"].items():
        label, unit = LABELS[key]
        f = m["fit"]
        linear = (
            "-"
            if f["linear"] is None
            else "yes"
            if f["linear"]
            else f"**no** (t={f['curvature_t']:.1f})"
        )
        rows.append(
            [
                f"{label} ({unit})",
                number(m["base"], 1),
                f"{f['slope']:+.3f} [{f['slope_lo']:+.3f}, {f['slope_hi']:+.3f}]",
                linear,
                _effect(m["faster_2x"]),
                _effect(m["free"]),
                _backtest(m["backtest"]),
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


def render_whatif(w: WhatIf) -> str:
    info = w.info
    parts = [
        f"# cputax whatif: {', '.join(info.get('components', []))}",
        "",
        f"Server: {info.get('target', '?')} ({info.get('gpu') or 'the model on this CPU'}); "
        f"profile {info.get('profile')}; slowdowns k = "
        f"{', '.join(str(k) for k in info.get('slowdowns', []))}; repeat {info.get('repeat')}; "
        f"CPU {info.get('cpu_model') or 'unknown'}.",
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
            [
                [
                    c["claim"],
                    c["scenario"],
                    ABSENT if c["effect"] is None else f"{c['effect']['pct']:+.1f}%",
                    "-"
                    if c["effect"] is None
                    else f"{c['effect']['pct_lo']:+.1f}% to {c['effect']['pct_hi']:+.1f}%",
                    c["sentence"],
                ]
                for c in w.claims
            ],
        ),
        "",
        "## The slowdown's accuracy",
        "",
        table(
            ["component", "added (ms)", "asked, k x d (ms)", "error"],
            [
                [
                    c,
                    number(v["added_ms"], 1),
                    number(v["target_ms"], 1),
                    _signed(v["error_pct"], 1) + "%" if v["error_pct"] is not None else ABSENT,
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
    for scenario, p in w.placebo.items():
        verdict = "within noise" if p["within_noise"] else "**an effect: do not conclude**"
        parts.append(
            f"- {scenario}: {number(p['added_ms'], 3)} ms added per request: {verdict} ("
            + "; ".join(
                f"{LABELS[k][0]} {_signed(e['value'])} [{_signed(e['lo'])}, {_signed(e['hi'])}]"
                for k, e in p["effects"].items()
            )
            + ")"
        )
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
        f"initial-scale=1'><title>{title}</title><style>{STYLE}</style></head><body>{body}</body></html>"
    )


def summary_lines(w: WhatIf) -> list[str]:
    """What `cputax whatif` prints at the end: notes, the placebo, each claim row measured."""
    lines = [f"note: {n}" for n in w.notes]
    for scenario, p in w.placebo.items():
        lines.append(
            f"placebo in {scenario}: "
            + ("within noise" if p["within_noise"] else "AN EFFECT: do not conclude")
        )
    for r in w.results:
        m = r["metrics"].get("e2e_p50")
        if m:
            lines.append(
                f"{r['component']} in {r['scenario']}: free -> e2e p50 {_effect(m['free'])}"
            )
    return lines
