"""The judgments a run's report states: which scenario crossed which line, in words.

Analysis makes them, with the thresholds named here, and puts them in the Summary
(`findings`, `in_short`); report/markdown.py only renders them. A finding carries the
threshold it used, so a reader (or a test) sees the line that was crossed.
"""

from __future__ import annotations

from typing import Any

from cputax.analysis.decompose import PROMPT_TOLERANCE
from cputax.analysis.profiling_findings import WAIT_SHARE
from cputax.results.attribution import AttributionResult
from cputax.results.calibration import Ceiling
from cputax.results.correlation import CorrelationResult
from cputax.results.summary import Finding, ScenarioSummary

__all__ = [
    "HTTP_OH_OVER_QUEUE",
    "PROMPT_TOLERANCE",
    "QUEUE_FLOOR_MS",
    "SHARED_STAMPS_PCT",
    "TTFT_DISAGREEMENT",
    "in_short",
    "scenario_findings",
]

HTTP_OH_OVER_QUEUE = 10.0  # HTTP OH this many times the engine's queue: the wait is in front
QUEUE_FLOOR_MS = 1.0  # a queue time below this counts as this (10x of ~0 is no finding)
TTFT_DISAGREEMENT = 0.25  # client vs server TTFT apart by more than this share of the client's
SHARED_STAMPS_PCT = 1.0  # % of tokens sharing a later token's stamp: the client fell behind


def _ms(value: float | None) -> str:
    """As the report writes milliseconds: one decimal under 100, none above."""
    if value is None:
        return "absent"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def _number(value: float | None) -> str:
    return "absent" if value is None else f"{value:,.0f}"


def _pct(value: float | None) -> str:
    return "absent" if value is None else f"{value:.1f}%"


def _finding(s: ScenarioSummary, kind: str, text: str, threshold: float | None = None) -> Finding:
    return Finding(kind=kind, text=text, scenario=s.name, threshold=threshold)


def scenario_findings(s: ScenarioSummary, info: dict[str, Any]) -> list[Finding]:
    """What one scenario's figures say beyond themselves (`info` is run.json: the client
    ceiling `cputax calibrate` stored)."""
    out = []
    if s.withheld:
        out.append(
            _finding(
                s,
                "withheld",
                (
                    f"not the server's numbers: {s.withheld}. Its CPU% and GPU% are withheld; its "
                    "phases carry the client's own stalls (docs/invariants.md)"
                ),
            )
        )
    lag = s.schedule_lag_ms
    if lag and lag.total_from_intended_p99 is not None:
        out.append(
            _finding(
                s,
                "schedule_lag",
                (
                    f"open loop; requests started {lag.p99:.2f} ms (p99) after their schedule; "
                    f"from the intended start, TTFT p99 {_ms(lag.ttft_from_intended_p99)} ms, "
                    f"total p99 {_ms(lag.total_from_intended_p99)} ms"
                ),
            )
        )
    if s.prompt_tokens_flagged:
        out.append(
            _finding(
                s,
                "prompt_size",
                (
                    f"prompts averaged {_number(s.prompt_tokens_mean)} tokens, "
                    f"{s.prompt_tokens_off_pct:+.1f}% off the {s.context_tokens:,} asked for"
                ),
                PROMPT_TOLERANCE,
            )
        )
    ceiling = Ceiling.of_run(info)
    if s.past_client_ceiling and ceiling and s.throughput:
        share = ceiling.share
        out.append(
            _finding(
                s,
                "client_ceiling",
                (
                    f"{s.throughput.chunks_per_s:,.0f} chunks/s, past {share:.0%} of what this "
                    "machine's client took in when `cputax calibrate` measured it "
                    f"({ceiling.max_chunks_per_s:,} chunks/s): the client's own lag is in the "
                    "loop's stamps, and in the kernel's once it is a token behind (shared stamps)"
                ),
                share,
            )
        )
    if (s.shared_stamps_pct or 0) > SHARED_STAMPS_PCT:
        out.append(
            _finding(
                s,
                "shared_stamps",
                (
                    f"{s.shared_stamps_pct:.1f}% of the tokens shared a read's stamp with a later "
                    "token: the client fell a token behind, or the server wrote tokens together; "
                    "their times are upper bounds. More client processes (`--client-procs`) or a "
                    "bigger client machine help in the first case"
                ),
                SHARED_STAMPS_PCT,
            )
        )
    srv = s.server
    if srv is not None and srv.api_server_cpu_s_per_request is None:
        out.append(
            _finding(
                s,
                "api_cpu_absent",
                (
                    "the server exported no process_cpu_seconds_total (vLLM drops it with more "
                    "than one API server): API CPU per request is absent; the host telemetry table "
                    "has every API server process's CPU"
                ),
            )
        )
    out += _server_vs_client(s)
    return out


def _server_vs_client(s: ScenarioSummary) -> list[Finding]:
    """The client's HTTP OH against the engine's queue, and both ends' TTFT."""
    means = s.server.mean_ms if s.server is not None else {}
    queue, ttft = means.get("queue"), means.get("ttft")
    oh = s.mean_ms.http_overhead
    out = []
    floor = None if queue is None else HTTP_OH_OVER_QUEUE * max(queue, QUEUE_FLOOR_MS)
    if floor is not None and oh is not None and oh > floor:
        out.append(
            _finding(
                s,
                "http_oh_over_queue",
                (
                    f"HTTP OH ({_ms(oh)} ms) is far above the engine's own queue time "
                    f"({_ms(queue)} ms): the wait is in the front end (template, tokenization, "
                    "event loop), not in the scheduler"
                ),
                HTTP_OH_OVER_QUEUE,
            )
        )
    client_ttft = None if oh is None or s.mean_ms.prefill is None else oh + s.mean_ms.prefill
    if (
        ttft is not None
        and client_ttft
        and abs(client_ttft - ttft) > TTFT_DISAGREEMENT * client_ttft
    ):
        out.append(
            _finding(
                s,
                "ttft_disagreement",
                (
                    f"the client saw TTFT {_ms(client_ttft)} ms (send -> first token), the server "
                    f"reports {_ms(ttft)} ms; the difference is time outside the server's clock "
                    "(front end before arrival is stamped, transit, client)"
                ),
                TTFT_DISAGREEMENT,
            )
        )
    return out


def _share(part: float | None, total: float) -> str:
    return f"{100 * (part or 0.0) / total:.0f}%"


def in_short(
    scenarios: list[ScenarioSummary],
    info: dict[str, Any],
    correlation: CorrelationResult | None,
    attribution: AttributionResult | None,
) -> str | None:
    """Two lines for the top of the report: where the heaviest scenario's time went, and what
    held the GPU (or, without GPU telemetry, the engine) back."""
    rows = [s for s in scenarios if s.mean_ms.total]
    if not rows:
        return None
    s = max(rows, key=lambda r: (r.concurrency or 0, r.context_tokens or 0))
    m, total = s.mean_ms, s.mean_ms.total
    first = (
        f"At {s.name} ({s.concurrency} at once, {s.context_tokens or 0:,}-token prompts) a "
        f"request took {_ms(total)} ms: {_share(m.decode, total)} decode, "
        f"{_share(m.prefill, total)} engine queue + prefill, "
        f"{_share(m.http_overhead, total)} in the server's front end before the headers, "
        f"{_share(m.serialize, total)} building it on the client."
    )
    gpu = next(
        (c.gpu for c in (correlation.scenarios if correlation else []) if c.name == s.name), None
    )
    if gpu and gpu.busy_pct is not None:
        split = sorted(gpu.stall_split.items(), key=lambda kv: -kv[1])[:2]
        where = (
            ", mostly " + " and ".join(name for name, _ in split) if split and gpu.stall_s else ""
        )
        second = (
            f"The GPU was busy {gpu.busy_pct:.0f}% of that scenario and idle while "
            f"requests were in flight {gpu.stall_pct or 0:.1f}% of it{where}."
        )
    else:
        second = "No GPU telemetry in this run, so GPU idle time is not measured"
        if info.get("target", {}).get("kind") == "embedded":
            second += " (the embedded target computes on this CPU: its engine time is CPU work)"
        second += "."
    if s.gpu_bubble_pct is not None:
        second += (
            f" Between its steps, with requests at the engine, the emulated GPU sat idle "
            f"{s.gpu_bubble_pct:.1f}% of the scenario, where the study's CPU% reads "
            f"{_pct(s.cpu_pct)}."
        )
    window = next(
        (w for w in (attribution.windows if attribution else []) if w.name == s.name), None
    )
    loop = next(
        (
            r
            for r in (window.threads if window else [])
            if r.process.startswith("engine_core") and r.thread == "MainThread"
        ),
        None,
    )
    if loop and loop.categories.get("worker_wait", 0) >= WAIT_SHARE:
        cats = loop.categories
        second += (
            f" The EngineCore's loop spent {100 * cats['worker_wait']:.0f}% of it waiting "
            "for the model step and "
            f"{100 * (cats.get('schedule', 0) + cats.get('kv_cache', 0)):.1f}% scheduling."
        )
    broken = [r.name for r in scenarios if r.withheld]
    if broken:
        first = (
            f"{len(broken)} scenario(s) ({', '.join(broken)}) break the run's invariants: "
            "the client's own stalls are in their phases, so their figures are not the "
            "server's (see Notes). " + first
        )
    return f"**In short**: {first}  \n{second}"
