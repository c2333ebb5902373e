"""The emulated GPU in the report: the banner that says the GPU is modelled and the CPU side
real (with every coefficient), and the per-scenario table of its busy time and bubbles."""

from __future__ import annotations

from typing import Any

from cputax.report.format import ms, number, pct, table
from cputax.report.telemetry import split_text
from cputax.results.correlation import CorrelationResult
from cputax.results.summary import Summary

__all__ = ["emulated_banner", "emulated_section"]

LAYOUTS = {
    "uni": "the model in the EngineCore process, as a single-GPU vLLM runs it (uni)",
    "mp": "the CPU platform's worker process on a shared-memory ring (mp)",
}


def _g(value: float) -> str:
    return f"{value:.3g}"


def emulated_banner(info: dict[str, Any]) -> list[str]:
    """The report's first lines for a run on the emulated GPU; [] for any other run."""
    gpu = (info.get("target") or {}).get("emulated_gpu")
    if not gpu:
        return []
    kv = (
        "not modelled"
        if gpu.get("kv_tokens") is None
        else (
            f"{gpu['kv_blocks']:,} blocks of {gpu['block_size']} = {gpu['kv_tokens']:,} tokens "
            "(--num-gpu-blocks-override)"
        )
    )
    speed = gpu.get("gpu_speed", 1)
    what = gpu.get("description") or gpu["gpu"]
    return [
        f"> **The GPU is emulated; the CPU side is real.** vLLM's front end, tokenizer, chat "
        f"template, scheduler, KV-cache manager, detokenizer and streaming ran on this machine's "
        f"CPU; each model step took the time `{gpu['name']}` models ({what}, speed x{speed}) and "
        f"used no CPU. Preset `{gpu['source']}`: {gpu['gpus']} x {gpu['gpu']}, "
        f"{_g(gpu['peak_flops'])} FLOP/s x {gpu['flops_efficiency']}, "
        f"{_g(gpu['mem_bandwidth'])} B/s x {gpu['bandwidth_efficiency']}, step overhead "
        f"{gpu['step_overhead_s'] * 1e3:g} ms, "
        f"context term {gpu['context_s_per_token'] * 1e6:g} µs/token; "
        f"model {gpu['model']}: {_g(gpu['params'])} params ({_g(gpu['active_params'])} active), "
        f"{gpu['bytes_per_param']:g} B/param, KV {gpu['kv_bytes_per_token']:,.0f} B/token; "
        f"KV capacity {kv}; a decode step at 1k context: {gpu['decode_step_ms_at_1k']:.2f} ms. "
        f"Executor layout: {LAYOUTS.get(gpu.get('layout'), gpu.get('layout') or 'not recorded')}.",
        "",
    ]


def emulated_section(summary: Summary, correlation: CorrelationResult | None) -> str | None:
    """Per scenario: the emulated GPU's busy % (exact, and as the correlation binned it), its
    steps, and the bubbles between steps while requests waited at the engine."""
    rows = [s for s in (correlation.scenarios if correlation else []) if s.emulated_gpu]
    if not rows:
        return None
    cpu = {s.name: s.cpu_pct for s in summary.scenarios}
    header = [
        "Scenario",
        "GPU busy % (steps)",
        "GPU busy % (correlation)",
        "steps",
        "step ms p50",
        "model error / wake lag ms p99",
        "step CPU %",
        "bubbles",
        "bubble ms p50 / p99",
        "bubbles % of wall",
        "study's CPU%",
        "server threads during bubbles",
    ]
    body = []
    for s in rows:
        em = s.emulated_gpu
        assert em is not None
        corr = s.gpu.busy_pct if s.gpu else None
        bubble_ms = f"{ms(em.bubble_ms.p50)} / {ms(em.bubble_ms.p99)}"
        body.append(
            [
                s.name,
                pct(em.busy_pct),
                pct(corr),
                number(em.steps),
                ms(em.step_ms.p50),
                f"{ms(em.model_error_ms.p99)} / {ms(em.wake_lag_ms.p99)}",
                pct(em.step_cpu_pct),
                number(em.bubbles),
                bubble_ms,
                pct(em.bubble_pct),
                pct(cpu.get(s.name)),
                split_text(em.bubble_split_top),
            ]
        )
    return "\n".join(
        [
            "## Emulated GPU: busy time and the bubbles between its steps",
            "",
            "Bubbles: the emulated GPU idle between two steps while at least one request was "
            "at the engine (prefill or decode). That time is the CPU side's: the engine loop, "
            "the worker's input preparation and sampling, the output path. The study's CPU% "
            "counts none of it, "
            'since it falls inside "decode". Thread categories come from py-spy (`--pyspy`).',
            "",
            table(header, body),
        ]
    )
