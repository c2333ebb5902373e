"""A sweep rendered: sweep.md and sweep.html (with a plot per knob) from the comparison
analysis.sweep made, and the lines `cputax sweep` prints at the end."""

from __future__ import annotations

import html
from typing import Any

from markdown_it import MarkdownIt

from cputax.report import plots
from cputax.report.format import ABSENT, number, table
from cputax.report.html import STYLE, image
from cputax.rundir import SweepDir

__all__ = ["render_sweep", "summary_lines", "write_sweep_report"]

# metric -> (label, unit): what analysis.sweep.METRICS measures, as the report names it
LABELS = {
    "http_overhead_ms": ("time to headers", "ms"), "queue_ms": ("server queue", "ms"),
    "prefill_ms": ("prefill (client)", "ms"), "decode_ms": ("decode", "ms"), "ttft_ms": ("TTFT (client)", "ms"),
    "itl_ms": ("time between tokens", "ms"), "output_tokens_per_s": ("output tokens/s", "tok/s"),
    "cpu_pct": ("CPU% (the study's)", "%"), "api_server_cpu_pct": ("API server CPU", "% of a core"),
    "engine_core_cpu_pct": ("EngineCore CPU", "% of a core"), "worker_cpu_pct": ("worker CPU", "% of a core"),
    "prefix_hash_share": ("prefix hashing, of EngineCore busy time", "%"),
    "schedule_share": ("scheduling + KV cache, of the engine loop", "%"),
    "worker_wait_share": ("waiting for the model step, of the engine loop", "%"),
}
CATEGORY_ROWS = ("schedule", "kv_cache", "worker_wait", "model_execute", "tokenize", "detokenize", "sse", "http",
                 "output_process", "ipc", "prefix_hash", "metrics", "metrics_scrape")


def _value(v: float | None, unit: str) -> str:
    if v is None:
        return ABSENT
    return number(v, 1 if abs(v) < 100 else 0) + ("%" if unit == "%" else "")


def _delta(row: dict[str, Any], unit: str) -> str:
    if row["delta"] is None:
        return ABSENT
    d = row["delta"]
    text = f"{d:+,.1f}" + (" pt" if unit == "%" else "")
    if row["within_spread"] is None:
        return text + " (no spread measure)"
    return text + (" (inside spread)" if row["within_spread"] else " (**beyond spread**)")


def _claims_table(claims: list[dict[str, Any]]) -> str:
    rows = [[c["study"], c["finding"], c["spread"] or "-", c["sentence"]] for c in claims]
    return table(["The study claimed", "This server shows", "Spread", "What it means"], rows)


def _comparison(comparison: dict[str, Any]) -> list[str]:
    configs = [c for c in comparison["configurations"] if c["scenarios"]]
    base = comparison["baseline"]
    parts = []
    scenarios = list(dict.fromkeys(n for c in configs for n in c["scenarios"]))
    deltas = {(d["configuration"], d["scenario"]): {r["component"]: r for r in d["rows"]} for d in comparison["deltas"]}
    for name in scenarios:
        header = ["Measurement", f"{base} (baseline)"] + [c["name"] for c in configs if c["name"] != base]
        rows = []
        for key, (label, unit) in LABELS.items():
            cells = []
            for c in configs:
                scenario = c["scenarios"].get(name)
                metric = scenario["metrics"][key] if scenario else None
                value = _value(metric["value"] if metric else None, unit)
                spread = metric["spread"] if metric else None
                if spread is not None:
                    value += f" ±{spread / 2:,.1f}"
                if c["name"] != base and (row := deltas.get((c["name"], name), {}).get(key)):
                    value += f"; {_delta(row, unit)}"
                cells.append(value)
            if any(cell != ABSENT for cell in cells):
                rows.append([f"{label} ({unit})", *cells])
        parts += [f"### {name}", "", table(header, rows), ""]
        cat_rows = []
        for role in ("api_server", "engine_core", "worker"):
            for cat in CATEGORY_ROWS:
                found = [(c["scenarios"].get(name) or {}).get("roles", {}).get(role) for c in configs]
                values = [None if roles is None else roles.get(cat, 0.0) for roles in found]
                if any(v for v in values):
                    cat_rows.append([f"{role}: {cat}", *(_value(v, "") for v in values)])
        if cat_rows:
            parts += ["Server CPU by process and category (py-spy, % of one core, summed over the role's "
                      "processes and threads):", "", table(["Where", *[c["name"] for c in configs]], cat_rows), ""]
    return parts


def render_sweep(info: dict[str, Any], comparison: dict[str, Any]) -> str:
    configs = comparison["configurations"]
    first = next((c for c in configs if c.get("server")), {}) or {}
    server = first.get("server") or {}
    parts = [
        f"# cputax sweep: {', '.join(info['varies'])}",
        "",
        f"- profile: `{info['profile']}`; {len(configs)} configurations x {info['repeat']} repeat(s), "
        "the order alternating between repeats",
        f"- server: {info['target']} {server.get('version') or ''}"
        + (f", your command `{info['serve_cmd']}`" if info.get("serve_cmd") else " (the embedded target, started "
           "for each configuration)"),
        f"- baseline: `{comparison['baseline']}`; every other configuration is compared with it",
        *[f"- note on `{flag}`: {note}" for flag, note in (info.get("notes") or {}).items()],
        "",
        "## What the study claimed, and what this server shows",
        "",
        _claims_table(comparison["claims"]),
        "",
        "## Configurations",
        "",
        table(["Configuration", "Runs", "Outcome"],
              [[c["name"], ", ".join(f"`{f}/`" for f in c["folders"]) or "-",
                "; ".join(f"{s['status']}: {s.get('message', '')}" for s in c["failed"]) or "measured"]
               for c in configs]),
        "",
        "## The comparison",
        "",
        "Means over the repeats, ± half the run-to-run spread (the larger of the range over a run's batches and "
        "the range over the repeats); each delta against the baseline is marked inside or beyond that spread, "
        "the larger of the two configurations'. A delta inside the spread is not a measured difference.",
        "",
        *_comparison(comparison),
    ]
    return "\n".join(parts).rstrip() + "\n"


def figures(info: dict[str, Any], comparison: dict[str, Any]) -> dict[str, bytes]:
    """A plot per knob: the measurement it should move, per scenario, each configuration side by side."""
    configs = [c for c in comparison["configurations"] if c["scenarios"]]
    scenarios = list(dict.fromkeys(n for c in configs for n in c["scenarios"]))
    out = {}
    for flag, metric in (info.get("moves") or {}).items():
        label, unit = LABELS.get(metric, (metric, ""))
        series = []
        for c in configs:
            values = [((c["scenarios"].get(n) or {}).get("metrics", {}).get(metric) or {}).get("value") for n in scenarios]
            spread = [((c["scenarios"].get(n) or {}).get("metrics", {}).get(metric) or {}).get("spread") for n in scenarios]
            series.append((c["name"], values, spread))
        png = plots.sweep_bars(f"{flag}: {label}", unit, scenarios, series)
        if png:
            out[f"sweep_{flag}"] = png
    return out


def write_sweep_report(sweep: SweepDir, comparison: dict[str, Any]) -> None:
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
        f"<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width, "
        f"initial-scale=1'><title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"{body}<h2>Figures</h2>{figures_html or '<p>no knob with a plot in this sweep</p>'}</body></html>")


def summary_lines(comparison: dict[str, Any]) -> list[str]:
    """What `cputax sweep` prints when it is done: each configuration's outcome, then each claim."""
    lines = []
    for c in comparison["configurations"]:
        state = "measured" if c["scenarios"] else "; ".join(s.get("message", s["status"]) for s in c["failed"]) or "no data"
        lines.append(f"{c['name']}: {state}")
    for claim in comparison["claims"]:
        lines.append(f"- {claim['study']}: {claim['sentence']}")
    return lines
