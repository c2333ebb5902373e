"""What `cputax run` and `cputax report` print on the terminal: the decomposition as a rich
table."""

from __future__ import annotations

from rich.table import Table

from cputax.report.format import ms, number, ratio_cell, scenario_cell
from cputax.results.summary import ScenarioSummary

__all__ = ["summary_table"]


def summary_table(scenarios: list[ScenarioSummary]) -> Table:
    table = Table(title="cputax: per-request decomposition (ms, mean; p99 in brackets)")
    for col in (
        "Scenario",
        "Conc",
        "Prompt tok",
        "Serialize",
        "HTTP OH",
        "Prefill",
        "Decode",
        "Total",
        "CPU%",
        "GPU%",
        "Err",
    ):
        table.add_column(col, justify="left" if col == "Scenario" else "right")
    for s in scenarios:
        cells = [
            f"{ms(getattr(s.mean_ms, k))} [{ms(getattr(s.p99_ms, k))}]"
            for k in ("serialize", "http_overhead", "prefill", "decode", "total")
        ]
        table.add_row(
            scenario_cell(s),
            str(s.concurrency),
            number(s.prompt_tokens_mean),
            *cells,
            ratio_cell(s, "cpu_pct"),
            ratio_cell(s, "gpu_pct"),
            str(s.errors),
        )
    return table
