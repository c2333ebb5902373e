"""`cputax whatif`: the slowdown plugin's accuracy, the fits, the component table against the
installed vLLM, and (slow) the experiment on the embedded vLLM."""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from pathlib import Path

import pytest

from cputax.analysis.whatif import (
    BACKTEST_PCT,
    PLACEBO_METRICS,
    backtest,
    claim_verdict,
    fit_line,
    judge_claims,
    judge_placebo,
    t95,
)
from cputax.commands.whatif import parse_slowdowns, plan_points
from cputax.emulation import slowdown
from cputax.errors import CputaxError
from cputax.report.whatif import render_whatif, summary_lines
from cputax.results.whatif import (
    FORMAT_VERSION,
    Backtest,
    ClaimEffect,
    Effect,
    Fit,
    MetricResult,
    Point,
    Result,
    Verdict,
    WhatIf,
)
from cputax.servers import get
from cputax.targets.slowdown import check_functions, missing_function

# whatif.json, whatif.md and the closing lines of a real version-1 experiment (the embedded
# vLLM, `schedule` and the placebo at k = 0, 1, 2, repeat 2: tests/test_whatif_vllm.py's),
# written by cputax before whatif.json was typed
V1 = Path(__file__).parent / "data" / "whatif-v1"


def _work(n: int) -> int:
    return sum(i * i for i in range(n))


@pytest.mark.parametrize("gil", ["held", "released"])
def test_the_slowdown_adds_k_times_the_calls_own_time(gil):
    """Call by call, against the call's wall time measured outside the wrapper: bounds a
    loaded machine cannot break (a wait for a core lands in a median's outliers or in one
    call of 21), which a slowdown counted twice still breaks in every call."""
    name, k = f"test-{gil}", 1.5
    fn = slowdown.slowed(_work, name, gil)
    expected = _work(20000)
    calls = []
    slowdown._slowdowns[name] = k
    try:
        for _ in range(21):
            before = list(slowdown._stats[name])
            start = time.perf_counter_ns()
            assert fn(20000) == expected
            outside = time.perf_counter_ns() - start
            n, own, added, target = (
                a - b for a, b in zip(slowdown._stats[name], before, strict=True)
            )
            calls.append((n, own, added, target, outside))
    finally:
        slowdown._slowdowns.pop(name)
    for n, own, added, target, outside in calls:
        assert n == 1
        assert target == int(k * own)  # asked: k times the call's own time
        assert added >= target  # the burn runs to its deadline: never short
        # own and added are disjoint spans inside the call: counting either twice exceeds it
        assert own + added <= outside
    # what the call took beyond own + added is the wrapper's bookkeeping (microseconds):
    # a burn done twice but counted once leaves k * own there in every call
    assert statistics.median(o - w - a for _, w, a, _, o in calls) < 0.25 * statistics.median(
        t for *_, t, _ in calls
    )
    # a burn past its deadline by a whole target (2x asked) would do so in every call; a wait
    # for a core at the deadline, on a loaded machine, does so in some
    assert min(a / t for _, _, a, t, _ in calls) <= 1.5


def test_released_slowdown_lets_another_thread_run_held_does_not():
    """With a long switch interval a thread holding the GIL keeps it: beside the spin (held)
    another Python thread gets nothing done; beside the hashing (released) it gets work done."""

    def progress(burn) -> int:
        count = [0]
        stop, started = threading.Event(), threading.Event()

        def spin() -> None:
            started.set()
            while not stop.is_set():
                count[0] += 1

        old = sys.getswitchinterval()
        sys.setswitchinterval(0.2)
        try:
            t = threading.Thread(target=spin)
            t.start()
            started.wait()
            start = count[0]
            burn(20_000_000)  # 20 ms, well inside the switch interval
            done = count[0] - start
            stop.set()
            t.join()
        finally:
            sys.setswitchinterval(old)
        return done

    assert progress(slowdown.burn_held) == 0
    assert progress(slowdown.burn_released) > 1000


def test_a_call_nested_in_a_slowed_call_adds_nothing():
    inner = slowdown.slowed(lambda: _work(5000), "test-inner", "held")
    outer = slowdown.slowed(lambda: inner(), "test-outer", "held")
    slowdown._slowdowns.update({"test-inner": 1.0, "test-outer": 1.0})
    try:
        outer()
    finally:
        slowdown._slowdowns.pop("test-inner")
        slowdown._slowdowns.pop("test-outer")
    assert slowdown._stats["test-inner"][2] == 0  # counted by the outer call
    assert slowdown._stats["test-outer"][2] > 0


def test_the_plugin_is_inert_unless_asked(monkeypatch):
    monkeypatch.delenv(slowdown.ENV, raising=False)
    before = dict(slowdown._state)
    slowdown.register()
    assert slowdown._state == before


def test_every_vllm_component_is_in_the_installed_vllm():
    pytest.importorskip("vllm")
    table = get("vllm")
    check_functions(table, list(table.components))  # raises with one line per missing function


def test_a_missing_function_fails_clearly():
    assert missing_function("cputax.emulation.slowdown:no_such_thing") is not None
    assert missing_function("cputax.emulation.slowdown:placebo_tick") is None
    assert missing_function("no_such_module_xyz:f") is not None
    with pytest.raises(CputaxError, match="unknown component"):
        check_functions(get("vllm"), ["schedulr"])


def test_fit_recovers_a_known_line_and_flags_a_curve():
    x = [0, 0, 1, 1, 2, 2]
    fit = fit_line(x, [10.0, 10.2, 12.1, 11.9, 14.0, 14.1])
    assert fit is not None and fit.slope_lo < 2.0 < fit.slope_hi and fit.linear
    curved = fit_line(x, [10.0, 10.1, 11.0, 11.1, 18.0, 18.1])
    assert curved is not None and curved.linear is False
    assert t95(1) > t95(5) > t95(100) > 1.9


def test_slowdowns_and_the_alternating_plan():
    assert parse_slowdowns("0.5,1") == (0.0, 0.5, 1.0)
    with pytest.raises(CputaxError):
        parse_slowdowns("1")
    points = plan_points(["a", "b"], (0.0, 0.5, 1.0), 2)
    assert points[0]["warmup"] and points[0]["component"] is None
    first = [(p["component"], p["k"]) for p in points if p["repeat"] == 0]
    second = [(p["component"], p["k"]) for p in points if p["repeat"] == 1]
    assert first == [(None, 0.0), ("a", 0.5), ("b", 0.5), ("a", 1.0), ("b", 1.0)]
    assert second == first[::-1]


def test_a_version_1_whatif_json_reads_typed_and_renders_as_before():
    w = WhatIf.load(V1 / "whatif.json")
    assert w.format_version == 1 and w.info.components == ["schedule", "placebo"]
    r = next(r for r in w.results if r.component == "schedule" and r.scenario == "conc8")
    assert isinstance(r.points["1.0"], Point) and r.points["1.0"].runs == 2
    e2e = r.metrics["e2e_p50"]
    assert isinstance(e2e.fit, Fit) and isinstance(e2e.backtest, Backtest)
    assert w.placebo["conc8"].effects["e2e_p50"].zero_inside in (True, False)
    assert w.claims and all(c.verdict is None for c in w.claims)  # version 2 adds them
    assert w.placebo_clean is None
    # the report renders the typed fields to what cputax rendered from the untyped file
    assert render_whatif(w) == (V1 / "whatif.md").read_text()
    assert summary_lines(w) == (V1 / "summary.txt").read_text().splitlines()


def test_whatif_json_round_trips_with_its_version(tmp_path):
    w = WhatIf.load(V1 / "whatif.json")
    w.format_version = FORMAT_VERSION
    w.placebo_clean = True
    w.claims[0].verdict = Verdict.NOT_MEASURED
    w.dump(tmp_path / "whatif.json")
    assert json.loads((tmp_path / "whatif.json").read_text())["format_version"] == 2
    assert WhatIf.load(tmp_path / "whatif.json") == w
    # the defaults written too: a version is never left to be guessed
    WhatIf().dump(tmp_path / "empty.json")
    assert json.loads((tmp_path / "empty.json").read_text())["format_version"] == FORMAT_VERSION


def test_another_version_or_a_misfit_fails_in_one_line(tmp_path):
    data = json.loads((V1 / "whatif.json").read_text())
    data["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "whatif.json").write_text(json.dumps(data))
    with pytest.raises(CputaxError) as err:
        WhatIf.load(tmp_path / "whatif.json")
    line = str(err.value)
    assert "\n" not in line and f"version {FORMAT_VERSION + 1}" in line
    assert "cputax whatif" in line
    data["format_version"] = 1
    data["results"][0]["points"] = "not a table"
    (tmp_path / "whatif.json").write_text(json.dumps(data))
    with pytest.raises(CputaxError, match="format 1 but") as err:
        WhatIf.load(tmp_path / "whatif.json")
    assert "\n" not in str(err.value)


def _gain(lo: float, hi: float) -> ClaimEffect:
    return ClaimEffect(pct=(lo + hi) / 2, pct_lo=lo, pct_hi=hi, ms=1.0)


def test_a_claim_verdict_turns_on_zero_and_the_placebo():
    assert claim_verdict(_gain(-0.5, 1.0), True) == Verdict.NOTHING_MEASURABLE
    assert claim_verdict(_gain(0.0, 1.0), True) == Verdict.NOTHING_MEASURABLE  # zero inside
    assert claim_verdict(_gain(0.1, 1.0), True) == Verdict.IMPROVES
    assert claim_verdict(_gain(-1.0, -0.1), True) == Verdict.WORSENS
    assert claim_verdict(_gain(0.1, 1.0), False) == Verdict.NO_CONCLUSION
    assert claim_verdict(None, True) == Verdict.NOT_MEASURED


def test_claims_judged_now_say_what_version_1_said():
    w = WhatIf.load(V1 / "whatif.json")
    rows = judge_claims(w.results, w.info.scenarios, placebo_ok=True)
    assert [(c.claim, c.effect, c.sentence) for c in rows] == [
        (c.claim, c.effect, c.sentence) for c in w.claims
    ]
    by_component = {c.component: c.verdict for c in rows}
    assert by_component["gpu"] == Verdict.NOT_A_SLOWDOWN
    assert by_component["tokenize"] == Verdict.NOT_MEASURED
    moved = judge_claims(w.results, w.info.scenarios, placebo_ok=False)
    measured = [c for c in moved if c.effect is not None]
    assert measured and all(c.verdict == Verdict.NO_CONCLUSION for c in measured)
    assert all(c.sentence.startswith("no conclusion") for c in measured)


def test_the_back_test_holds_inside_its_interval_or_within_its_percent():
    # slowed points on an exact line through 100 at x = 0: the interval is ~0 wide, so the
    # percent alone decides; the measured unslowed value sits just inside, then just outside
    xs, ks = [1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]
    ys = [100.0 + 3.0 * x for x in xs]
    near = 100.0 / (1 + 0.9 * BACKTEST_PCT / 100)
    far = 100.0 / (1 + 1.1 * BACKTEST_PCT / 100)
    inside = backtest([0.0, *xs], [near, *ys], [0.0, *ks], [near])
    outside = backtest([0.0, *xs], [far, *ys], [0.0, *ks], [far])
    assert inside is not None and inside.half_width < 1e-6 and inside.holds
    assert outside is not None and not outside.holds
    # a noisy line: an error beyond the percent still holds inside the prediction's interval
    noisy = [103.0, 105.0, 104.0, 110.0]
    wide = backtest([0.0, *xs], [90.0, *noisy], [0.0, *ks], [90.0])
    assert wide is not None and abs(wide.error_pct) > BACKTEST_PCT and wide.holds
    assert abs(wide.error) <= wide.half_width


_NO_EFFECT = Effect(value=0.0, lo=0.0, hi=0.0, pct=None, pct_lo=None, pct_hi=None)


def _placebo_result(slopes: dict[str, tuple[float, float]]) -> Result:
    fits = {
        key: MetricResult(
            base=100.0,
            fit=Fit(
                slope=(lo + hi) / 2, slope_lo=lo, slope_hi=hi, intercept=100.0, points=6, r2=None
            ),
            faster_2x=_NO_EFFECT,
            free=_NO_EFFECT,
        )
        for key, (lo, hi) in slopes.items()
    }
    points = {
        "0.0": Point(added_ms=0.0, own_ms=0.1, calls=1.0, runs=2),
        "2.0": Point(added_ms=0.2, own_ms=0.1, calls=1.0, runs=2),
    }
    return Result(
        component="placebo", scenario="s", own_ms_per_request=0.1, points=points, metrics=fits
    )


def test_the_placebo_is_judged_by_its_metrics_intervals_at_the_largest_slowdown():
    clean = {"throughput": (-5.0, 5.0), "e2e_p50": (-1.0, 1.0), "itl_p99": (0.5, 2.0)}
    got = judge_placebo([_placebo_result(clean)], "placebo")["s"]
    assert got.added_ms == pytest.approx(0.2)
    assert got.effects["e2e_p50"].lo == pytest.approx(-0.2)  # the slope times 0.2 ms
    # itl_p99 moved, but the placebo is judged by PLACEBO_METRICS only
    assert "itl_p99" not in PLACEBO_METRICS and not got.effects["itl_p99"].zero_inside
    assert got.within_noise
    for metric in PLACEBO_METRICS:
        moved = {**clean, metric: (0.1, 2.0)}
        assert not judge_placebo([_placebo_result(moved)], "placebo")["s"].within_noise
    assert judge_placebo([_placebo_result(clean)], None) == {}


def test_the_effect_of_removing_time_follows_the_slope():
    from cputax.analysis.whatif import effect

    # 2 ms of the component per request; each added ms per request costs 3 ms of latency
    x = [0.0, 0.0, 2.0, 2.0, 4.0, 4.0]
    y = [100.0 + 3.0 * v + d for v, d in zip(x, (0.1, -0.1, 0.2, -0.2, 0.1, -0.1), strict=True)]
    fit = fit_line(x, y)
    assert fit is not None
    free, half = effect(fit, 2.0, 100.0), effect(fit, 1.0, 100.0)
    assert free.value == pytest.approx(-6.0, abs=0.2) and free.lo < free.value < free.hi
    assert free.pct == pytest.approx(-6.0, abs=0.2)
    assert half.value == pytest.approx(free.value / 2)
