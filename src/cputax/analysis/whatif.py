"""What a slowdown experiment says: per component and scenario, each metric fitted against
the time the slowdown added per request, extrapolated to the component being 2x faster and
free, with intervals; the back-test, the placebo and the study's claims.

The method is a slowdown experiment (the simple form of causal profiling, Curtsinger and
Berger, SOSP 2015): it is valid where the response is linear in the added time, which the
curvature test and the back-test check. A placebo with an effect voids every conclusion.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import numpy as np

from cputax.analysis.decompose import phases
from cputax.results.whatif import (
    METRICS,
    Backtest,
    Claim,
    ClaimEffect,
    Effect,
    Fit,
    Info,
    MetricResult,
    Placebo,
    PlaceboEffect,
    Point,
    Result,
    Slowdown,
    Verdict,
    WhatIf,
)
from cputax.rundir import RunDir, WhatIfDir

__all__ = [
    "BACKTEST_PCT",
    "CLAIMS",
    "METRICS",
    "PLACEBO_METRICS",
    "analyse_whatif",
    "backtest",
    "claim_verdict",
    "effect",
    "fit_line",
    "judge_claims",
    "judge_placebo",
    "point_values",
    "t95",
]

# The study's recommendations (claim, the component that tests it, the metric it is about).
CLAIMS = (
    ("move tokenization off the main event loop: 2-3%", "tokenize", "e2e_p50"),
    ("batch scheduling decisions: 3-5%", "schedule", "throughput"),
    ("a Rust scheduler: 4-8% E2E at concurrency 32", "schedule+update_from_output", "e2e_p50"),
    ("pre-allocate KV blocks: 2-3%", "kv_cache", "e2e_p50"),
    ("even an infinitely fast GPU recovers only 85-90%", "gpu", "e2e_p50"),
)
NOT_A_SLOWDOWN = {"gpu"}  # claims measured another way (the emulated GPU's --gpu-speed)
PLACEBO_METRICS = ("throughput", "e2e_p50")  # what the placebo is judged by
BACKTEST_PCT = 5.0  # a back-test within this error holds even outside its interval (the issue's)
_T95 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t95(df: int) -> float:
    """Student's t for a two-sided 95% interval (no scipy: the table, then the normal's)."""
    if df < 1:
        return math.inf
    return _T95[df - 1] if df <= len(_T95) else 1.96 + 2.4 / df


def fit_line(x: list[float], y: list[float]) -> Fit | None:
    """Least squares y = a + b x with b's 95% interval, and the curvature test when x has
    three or more distinct values (None: fewer than three points or one x)."""
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    n = len(xs)
    sxx = float(((xs - xs.mean()) ** 2).sum())
    if n < 3 or sxx <= 0:
        return None
    b = float(((xs - xs.mean()) * (ys - ys.mean())).sum() / sxx)
    a = float(ys.mean() - b * xs.mean())
    resid = ys - (a + b * xs)
    s2 = float((resid**2).sum()) / (n - 2)
    half = t95(n - 2) * math.sqrt(s2 / sxx)
    total = float(((ys - ys.mean()) ** 2).sum())
    fit = Fit(
        slope=b,
        slope_lo=b - half,
        slope_hi=b + half,
        intercept=a,
        points=n,
        r2=None if total <= 0 else 1.0 - float((resid**2).sum()) / total,
    )
    if len(set(np.round(xs, 9))) >= 3 and n >= 4:
        design = np.column_stack([np.ones(n), xs, xs**2])
        coef, *_ = np.linalg.lstsq(design, ys, rcond=None)
        r = ys - design @ coef
        s2q = float((r**2).sum()) / (n - 3) if n > 3 else 0.0
        cov = s2q * np.linalg.pinv(design.T @ design)
        se = math.sqrt(max(float(cov[2, 2]), 0.0))
        fit.curvature_t = None if se == 0 else float(coef[2] / se)
        fit.linear = fit.curvature_t is None or abs(fit.curvature_t) <= t95(n - 3)
    return fit


def _predict(x: list[float], y: list[float], x0: float) -> tuple[float, float] | None:
    """The fitted line's mean at x0 and its 95% half-width."""
    fit = fit_line(x, y)
    if fit is None:
        return None
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    n = len(xs)
    s2 = float(((ys - (fit.intercept + fit.slope * xs)) ** 2).sum()) / (n - 2)
    sxx = float(((xs - xs.mean()) ** 2).sum())
    half = t95(n - 2) * math.sqrt(s2 * (1.0 / n + (x0 - xs.mean()) ** 2 / sxx))
    return fit.intercept + fit.slope * x0, half


def _pct(v: float, base: float | None) -> float | None:
    return None if not base else 100.0 * v / base


def effect(fit: Fit, removed_ms: float, base: float | None) -> Effect:
    """The change of the metric when `removed_ms` per request of the component's time goes."""
    lo, hi = sorted((-fit.slope_hi * removed_ms, -fit.slope_lo * removed_ms))
    value = -fit.slope * removed_ms
    return Effect(
        value=value,
        lo=lo,
        hi=hi,
        pct=_pct(value, base),
        pct_lo=_pct(lo, base),
        pct_hi=_pct(hi, base),
    )


def point_values(run: RunDir, scenario: str) -> dict[str, Any] | None:
    """One point's measurements of one scenario: the metrics, the requests, and each slowed
    component's totals per request (ms); None when the scenario has no finished request."""
    info = run.info()
    table = run.read_request_table().of_scenario(scenario)
    window = next((w for w in run.read_windows() if w["scenario"] == scenario), None)
    done = int(table.ok.sum())
    if not done or window is None:
        return None
    ph = phases(table)
    ttft = ph["serialize"] + ph["http_overhead"] + ph["prefill"]
    out = table["output_tokens"][table.ok]
    out = out[: len(ph["decode"])]
    itl = ph["decode"][out > 1] / (out[out > 1] - 1)
    wall = (window["end_ns"] - window["start_ns"]) / 1e9
    values = {
        "throughput": float(np.nansum(table["output_tokens"][table.ok])) / wall
        if wall > 0
        else None
    }
    for name, v in (("ttft", ttft), ("itl", itl), ("e2e", ph["total"])):
        for q in (50, 99):
            values[f"{name}_p{q}"] = float(np.percentile(v, q)) if len(v) else None
    comps = (((info.get("monitors") or {}).get("slowdown") or {}).get("windows") or {}).get(
        scenario, {}
    )
    per_request = {
        c: {
            "calls": t["calls"] / done,
            "own_ms": t["own_ns"] / 1e6 / done,
            "added_ms": t["added_ns"] / 1e6 / done,
            "target_ms": t["target_ns"] / 1e6 / done,
        }
        for c, t in comps.items()
    }
    return {"values": values, "requests": done, "components": per_request}


def _members(component: str) -> list[str]:
    return component.split("+")


def _component_x(point: dict[str, Any], component: str, key: str) -> float:
    return sum(point["components"].get(m, {}).get(key, 0.0) for m in _members(component))


def backtest(
    xs: list[float], ys: list[float], ks: list[float], base: list[float]
) -> Backtest | None:
    """Predict the unslowed value from the slowed points alone; compare with the measured one:
    it holds inside the prediction's interval, or within BACKTEST_PCT."""
    slowed = [(x, y) for x, y, k in zip(xs, ys, ks, strict=True) if k > 0]
    if not base or len(slowed) < 3:
        return None
    got = _predict([x for x, _ in slowed], [y for _, y in slowed], 0.0)
    if got is None:
        return None
    predicted, half = got
    measured = float(np.mean(base))
    error = predicted - measured
    pct = _pct(error, measured)
    return Backtest(
        predicted=predicted,
        measured=measured,
        error=error,
        error_pct=pct,
        half_width=half,
        holds=abs(error) <= half or (pct is not None and abs(pct) <= BACKTEST_PCT),
    )


def _mean_x(points: list[dict[str, Any]], component: str, key: str) -> float:
    return float(np.mean([_component_x(p["values"], component, key) for p in points]))


def _scenario_result(component: str, scenario: str, points: list[dict[str, Any]]) -> Result | None:
    """Fits of every metric for one component in one scenario, from its points and the
    baseline."""
    use = [p for p in points if p["component"] in (None, component) and p["values"] is not None]
    base = [p for p in use if p["k"] == 0]
    if not base or len(use) < 3:
        return None
    own = _mean_x(base, component, "own_ms")
    xs = [_component_x(p["values"], component, "added_ms") for p in use]
    metrics = {}
    for key in METRICS:
        measured = [
            (x, p) for x, p in zip(xs, use, strict=True) if p["values"]["values"][key] is not None
        ]
        pairs = [(x, p["values"]["values"][key]) for x, p in measured]
        fit = fit_line([x for x, _ in pairs], [y for _, y in pairs])
        if fit is None:
            continue
        base_values = [
            p["values"]["values"][key] for p in base if p["values"]["values"][key] is not None
        ]
        y0 = float(np.mean(base_values)) if base_values else None
        metrics[key] = MetricResult(
            base=y0,
            fit=fit,
            faster_2x=effect(fit, own / 2, y0),
            free=effect(fit, own, y0),
            backtest=backtest(
                [x for x, _ in pairs],
                [y for _, y in pairs],
                [p["k"] for _, p in measured],
                base_values,
            ),
        )
    added = {}
    for k in sorted({p["k"] for p in use}):
        at = [p for p in use if p["k"] == k]
        added[str(k)] = Point(
            added_ms=_mean_x(at, component, "added_ms"),
            own_ms=_mean_x(at, component, "own_ms"),
            calls=_mean_x(at, component, "calls"),
            runs=len(at),
        )
    return Result(
        component=component,
        scenario=scenario,
        own_ms_per_request=own,
        points=added,
        metrics=metrics,
        nonlinear=sorted(k for k, m in metrics.items() if m.fit.linear is False),
    )


def _slowdown_error(points: list[dict[str, Any]], components: list[str]) -> dict[str, Slowdown]:
    """The time the slowdown added against what it was asked (k * d), per component, all
    windows."""
    out = {}
    for comp in components:
        added = target = 0.0
        for p in points:
            if p["component"] != comp:
                continue
            for values in p["scenarios"].values():
                if values is None:
                    continue
                added += _component_x(values, comp, "added_ms") * values["requests"]
                target += _component_x(values, comp, "target_ms") * values["requests"]
        out[comp] = Slowdown(
            added_ms=added,
            target_ms=target,
            error_pct=_pct(added - target, target) if target else None,
        )
    return out


def _as_gain(free: Effect, metric: str) -> ClaimEffect:
    """The component being free as a gain in % (positive is better, whatever the metric)."""
    if METRICS[metric].higher_is_better:
        return ClaimEffect(pct=free.pct, pct_lo=free.pct_lo, pct_hi=free.pct_hi, ms=free.value)
    return ClaimEffect(
        pct=None if free.pct is None else -free.pct,
        pct_lo=None if free.pct_hi is None else -free.pct_hi,
        pct_hi=None if free.pct_lo is None else -free.pct_lo,
        ms=free.value,
    )


def claim_verdict(gain: ClaimEffect | None, placebo_ok: bool) -> str:
    """What a claim row concludes from the component's gain when free (None: not measured):
    nothing when the placebo moved; nothing measurable when the interval includes zero."""
    if gain is None:
        return Verdict.NOT_MEASURED
    if not placebo_ok:
        return Verdict.NO_CONCLUSION
    lo, hi = gain.pct_lo, gain.pct_hi
    if lo is None or hi is None or lo <= 0 <= hi:
        return Verdict.NOTHING_MEASURABLE
    return Verdict.IMPROVES if lo > 0 else Verdict.WORSENS


def _claim_sentence(verdict: str, component: str, metric: str, gain: ClaimEffect) -> str:
    if verdict == Verdict.NO_CONCLUSION:
        return "no conclusion: the placebo moved, so the method or the noise is the problem"
    if verdict == Verdict.NOTHING_MEASURABLE and gain.pct_lo is not None:
        return (
            f"making {component} free buys nothing measurable here: its interval "
            f"({gain.pct_lo:+.1f}% to {gain.pct_hi:+.1f}%) includes zero"
        )
    if verdict == Verdict.NOTHING_MEASURABLE:
        return f"making {component} free buys nothing measurable here (no unslowed value)"
    return (
        f"making {component} free would improve {METRICS[metric].label} by "
        f"{gain.pct:+.1f}% ({gain.pct_lo:+.1f}% to {gain.pct_hi:+.1f}%)"
    )


def _claim(
    claim: str, scenario: str, component: str, metric: str, found: Result | None, placebo_ok: bool
) -> Claim:
    """One claim in one scenario: its verdict and the sentence that says it."""
    row = Claim(
        claim=claim, scenario=scenario, component=component, metric=metric, effect=None, sentence=""
    )
    m = None if found is None else found.metrics.get(metric)
    if component in NOT_A_SLOWDOWN:
        row.verdict = Verdict.NOT_A_SLOWDOWN
        row.sentence = (
            "not a slowdown: compare this experiment's baseline with one run with "
            "--gpu-speed inf (the emulated GPU free)"
        )
    elif m is None:
        row.verdict = Verdict.NOT_MEASURED
        row.sentence = f"not measured: run with --component {component}"
    else:
        row.effect = _as_gain(m.free, metric)
        row.verdict = claim_verdict(row.effect, placebo_ok)
        row.sentence = _claim_sentence(row.verdict, component, metric, row.effect)
    return row


def judge_claims(results: list[Result], scenarios: list[str], placebo_ok: bool) -> list[Claim]:
    """One row per study claim (CLAIMS) and scenario, judged from the results."""
    found = {(r.component, r.scenario): r for r in results}
    return [
        _claim(claim, scenario, component, metric, found.get((component, scenario)), placebo_ok)
        for claim, component, metric in CLAIMS
        for scenario in scenarios
    ]


def judge_placebo(results: list[Result], placebo: str | None) -> dict[str, Placebo]:
    """Per scenario: the placebo's effect at the largest slowdown, per metric, and whether
    the intervals of the metrics the claims turn on (PLACEBO_METRICS) include zero: judging
    all seven at 95% would raise a false alarm one time in three."""
    out = {}
    for r in results:
        if r.component != placebo:
            continue
        biggest = max(v.added_ms for v in r.points.values())
        effects = {}
        for key, m in r.metrics.items():
            f = m.fit
            lo, hi = sorted((f.slope_lo * biggest, f.slope_hi * biggest))
            effects[key] = PlaceboEffect(
                value=f.slope * biggest, lo=lo, hi=hi, zero_inside=lo <= 0 <= hi
            )
        out[r.scenario] = Placebo(
            added_ms=biggest,
            effects=effects,
            within_noise=all(e.zero_inside for k, e in effects.items() if k in PLACEBO_METRICS),
        )
    return out


def _notes(results: list[Result], placebo_clean: bool | None) -> list[str]:
    notes = []
    if placebo_clean is None:
        notes.append(
            "no placebo was run: nothing checks that the method sees no effect where there is none"
        )
    elif not placebo_clean:
        notes.append(
            "the placebo showed an effect outside its interval: the method or the noise is the "
            "problem; the effects below are not conclusions"
        )
    for r in results:
        if r.nonlinear:
            notes.append(
                f"{r.component} in {r.scenario}: the response is not linear in the added time "
                f"({', '.join(r.nonlinear)}): the extrapolation is a guess there"
            )
    return notes


def analyse_whatif(exp: WhatIfDir) -> WhatIf:
    """The experiment's fits and judgments from plan.json and each point's run directory;
    written to whatif.json and returned."""
    plan = exp.read_plan()
    points = []
    for step in plan["points"]:
        if step.get("status") not in ("ok", "errors") or step.get("warmup"):
            continue
        run = exp.run(step["folder"])
        scenarios = {s: point_values(run, s) for s in plan["scenarios"]}
        points.append({"component": step["component"], "k": step["k"], "scenarios": scenarios})
    results = []
    for component in plan["components"]:
        for scenario in plan["scenarios"]:
            per = [
                {"component": p["component"], "k": p["k"], "values": p["scenarios"].get(scenario)}
                for p in points
            ]
            if (r := _scenario_result(component, scenario, per)) is not None:
                results.append(r)
    placebo = judge_placebo(results, plan.get("placebo"))
    placebo_clean = all(p.within_noise for p in placebo.values()) if placebo else None
    result = WhatIf(
        info=msgspec.convert({k: v for k, v in plan.items() if k != "points"}, Info),
        slowdown=_slowdown_error(points, plan["components"]),
        results=results,
        placebo=placebo,
        placebo_clean=placebo_clean,
        claims=judge_claims(results, plan["scenarios"], placebo_clean is not False),
        notes=_notes(results, placebo_clean),
    )
    result.dump(exp.result)
    return result
