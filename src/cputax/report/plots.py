"""The report's figures as PNG bytes (matplotlib, no display needed).

Figures are built on matplotlib.figure.Figure directly, not pyplot: no global backend
or figure state, so rendering inside `cputax run` cannot open a window or leak memory.
"""

from __future__ import annotations

import io
from typing import Any

from matplotlib.figure import Figure

from cputax.results.correlation import Timeline
from cputax.results.summary import GrowthRow, ScenarioSummary

WALL_PHASES = (
    ("serialize", "Serialize (client)", "#9ecae1"),
    ("http_overhead", "HTTP OH (front end)", "#fd8d3c"),
    ("prefill", "Prefill (queue + prefill)", "#74c476"),
    ("decode", "Decode", "#31a354"),
)
INFLIGHT = (
    ("client", "client side", "#9ecae1"),
    ("front_end", "front end", "#fd8d3c"),
    ("prefill", "prefill / queue", "#74c476"),
    ("decode", "decode", "#31a354"),
)
STALL_COLOR = "#d62728"


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def decomposition_bars(scenarios: list[ScenarioSummary]) -> bytes | None:
    """The study's stacked bars: each scenario's mean request split into its wall-time
    phases (share of the mean total), with CPU% and the total on top."""
    rows = [s for s in scenarios if s.mean_ms.total and s.mean_share_pct is not None]
    if not rows:
        return None
    fig = Figure(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.5))
    ax = fig.subplots()
    x = range(len(rows))
    bottom = [0.0] * len(rows)
    for key, label, color in WALL_PHASES:
        share = [getattr(s.mean_share_pct, key) or 0.0 for s in rows]
        ax.bar(x, share, bottom=bottom, label=label, color=color, width=0.7)
        bottom = [b + v for b, v in zip(bottom, share, strict=True)]
    for i, s in enumerate(rows):
        cpu = "" if s.cpu_pct is None else f"CPU {s.cpu_pct:.1f}%\n"
        if s.withheld and s.invariants is not None:
            cpu = f"INVALID {s.invariants.broken}/{s.invariants.checked}\nCPU% withheld\n"
        ax.text(
            i,
            min(bottom[i], 100.0) + 1,
            f"{cpu}{s.mean_ms.total:,.0f} ms",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(list(x), [s.name for s in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 118)
    ax.set_ylabel("% of mean request time")
    ax.set_title("Where a request's time goes (means per scenario)")
    # below the axes: a legend inside would sit on the bars
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncols=4, frameon=False)
    return _png(fig)


def http_overhead_plot(
    scenarios: list[ScenarioSummary], growth_rows: list[GrowthRow]
) -> bytes | None:
    """HTTP overhead (mean, p99 dashed) against concurrency, one line per context size
    (`growth_rows`: analysis.decompose.http_overhead_growth)."""
    rows = [s for s in scenarios if s.mean_ms.http_overhead is not None and s.concurrency]
    if not rows:
        return None
    growth = {r.scenario: r.growth for r in growth_rows}
    fig = Figure(figsize=(6.5, 4.0))
    ax = fig.subplots()
    for ctx in sorted({s.context_tokens or 0 for s in rows}):
        group = sorted(
            (s for s in rows if (s.context_tokens or 0) == ctx), key=lambda s: s.concurrency
        )
        conc = [s.concurrency for s in group]
        line = ax.plot(
            conc, [s.mean_ms.http_overhead for s in group], marker="o", label=f"{ctx:,} tokens"
        )[0]
        ax.plot(
            conc,
            [s.p99_ms.http_overhead for s in group],
            linestyle="--",
            color=line.get_color(),
            alpha=0.6,
        )
        for s in group:
            if growth.get(s.name):
                ax.annotate(
                    f"{growth[s.name]:.1f}x",
                    (s.concurrency, s.mean_ms.http_overhead),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                )
    ax.set_xscale("log", base=2)
    levels = sorted({s.concurrency for s in rows})
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.minorticks_off()
    ax.set_xlabel("concurrency")
    ax.set_ylabel("HTTP overhead ms (solid mean, dashed p99)")
    ax.set_title("Time to response headers vs concurrency")
    ax.legend(fontsize=8, frameon=False)
    return _png(fig)


def timeline_plot(name: str, t: Timeline) -> bytes:
    """GPU busy, server CPU, requests in flight by phase, on one time axis; stalls shaded."""
    fig = Figure(figsize=(10.0, 6.5))
    axes = fig.subplots(3, 1, sharex=True)
    x = t.t_s + [t.end_s]  # bin edges: each series repeats its last value to the end

    def edges(values: list[Any]) -> list[Any]:
        return values + values[-1:]

    ax = axes[0]
    if t.gpu is not None:
        busy = [float("nan") if v is None else v for v in t.gpu]
        ax.step(x, edges(busy), where="post", color="#3182bd")
        ax.set_ylim(-5, 105)
        ax.set_ylabel("GPU busy %")
    else:
        ax.text(
            0.5,
            0.5,
            "no GPU telemetry",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="grey",
        )
        ax.set_yticks([])
    ax = axes[1]
    if t.cpu:
        cpu = t.cpu
        labels = sorted(cpu, key=lambda k: -sum(cpu[k]))
        top, rest = labels[:8], labels[8:]
        series = [edges(cpu[k]) for k in top]
        if rest:
            series.append(edges([sum(vals) for vals in zip(*(cpu[k] for k in rest), strict=True)]))
            top.append("other")
        ax.stackplot(x, series, labels=top, step="post", alpha=0.85)
        ax.legend(fontsize=7, loc="upper right", ncols=2, frameon=False)
        ax.set_ylabel(f"server CPU (cores)\nby {t.cpu_by}")
    else:
        ax.text(
            0.5,
            0.5,
            "no server CPU data (remote server, no py-spy)",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="grey",
        )
        ax.set_yticks([])
    ax = axes[2]
    present = [(k, label, color) for k, label, color in INFLIGHT if k in t.inflight]
    ax.stackplot(
        x,
        [edges(t.inflight[k]) for k, _, _ in present],
        labels=[label for _, label, _ in present],
        colors=[c for _, _, c in present],
        step="post",
    )
    ax.set_ylabel("requests in flight")
    ax.set_xlabel("seconds since the scenario started")
    ax.legend(fontsize=7, loc="upper right", ncols=4, frameon=False)
    for ax in axes:
        for a, b in t.stalls:
            ax.axvspan(a, b, color=STALL_COLOR, alpha=0.15, linewidth=0)
    stalled = " (red: GPU idle while requests were in flight)" if t.stalls else ""
    fig.suptitle(f"{name}: {t.width_s * 1000:.0f} ms bins{stalled}", fontsize=10)
    return _png(fig)


def sweep_bars(
    title: str,
    unit: str,
    scenarios: list[str],
    series: list[tuple[str, list[float | None], list[float | None]]],
) -> bytes | None:
    """One measurement per scenario, the configurations side by side; the whiskers span each
    configuration's run-to-run spread (centred on its mean). `series`: (configuration,
    values per scenario, spreads per scenario)."""
    if not scenarios or not series or all(v is None for _, values, _ in series for v in values):
        return None
    fig = Figure(figsize=(max(6.0, 1.4 * len(scenarios) * max(1, len(series)) / 2 + 2), 4.0))
    ax = fig.subplots()
    width = 0.8 / len(series)
    for k, (name, values, spread) in enumerate(series):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(scenarios))]
        heights = [v or 0.0 for v in values]
        errors = [(s or 0.0) / 2 for s in spread]
        ax.bar(xs, heights, width=width * 0.95, label=name, yerr=errors, capsize=3)
    ax.set_xticks(list(range(len(scenarios))), scenarios, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.legend(
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.25),
        ncols=min(3, len(series)),
        frameon=False,
    )
    return _png(fig)


SPLIT = (
    ("http_in", "HTTP in", "#fdd0a2"),
    ("front_end", "front end", "#fd8d3c"),
    ("engine_queue", "engine queue", "#a63603"),
)


def split_plot(scenarios: list[ScenarioSummary]) -> bytes | None:
    """HTTP in, front end and engine queue (p50, stacked; p99 of their sum dashed) against
    concurrency, one panel per context size: the study's HTTP overhead, measured."""
    rows = [
        s
        for s in scenarios
        if s.concurrency and s.server_phases is not None and s.server_phases.phases_ms.front_end
    ]
    if not rows:
        return None
    contexts = sorted({s.context_tokens or 0 for s in rows})
    fig = Figure(figsize=(6.5 * len(contexts), 4.0))
    axes = fig.subplots(1, len(contexts), squeeze=False)[0]
    for ax, ctx in zip(axes, contexts, strict=True):
        group = sorted(
            (s for s in rows if (s.context_tokens or 0) == ctx), key=lambda s: s.concurrency
        )
        x = range(len(group))
        bottom = [0.0] * len(group)
        for key, label, color in SPLIT:
            stats = [getattr(s.server_phases.phases_ms, key) for s in group]
            values = [max(0.0, st.p50) if st is not None else 0.0 for st in stats]
            ax.bar(x, values, bottom=bottom, label=f"{label} (p50)", color=color, width=0.6)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        client = [s.p50_ms.http_overhead for s in group]
        ax.plot(list(x), client, marker="o", color="black", label="client time to headers (p50)")
        ax.set_xticks(list(x), [str(s.concurrency) for s in group])
        ax.set_xlabel("concurrency")
        ax.set_ylabel("ms")
        ax.set_title(f"HTTP overhead, split per request ({ctx:,} tokens)")
        ax.legend(fontsize=8, frameon=False)
    return _png(fig)
