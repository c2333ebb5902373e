"""`cputax whatif` on the embedded vLLM (emulated GPU), end to end, on a small profile.

One experiment (module fixture): `schedule` and the placebo at k = 0, 1, 2, twice each,
one scenario of 8 streams. It starts its own server (the plugin must be in the server's
environment from the start), about 40 s, then ten short points.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import needs_vllm

from cputax.results.whatif import Result, Verdict, WhatIf

pytestmark = [pytest.mark.slow, pytest.mark.local, needs_vllm]

PROFILE = """
[defaults]
max_tokens = 16
context_tokens = 500
warmup = 1

[[scenario]]
name = "conc8"
concurrency = 8
batches = 3
"""
SLOWDOWNS = (1.0, 2.0)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("whatif")
    (root / "small.toml").write_text(PROFILE)
    out = root / "exp"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cputax.cli",
            "whatif",
            "--component",
            "schedule",
            "--slowdowns",
            ",".join(str(k) for k in (0.0, *SLOWDOWNS)),
            "--repeat",
            "2",
            "--profile",
            str(root / "small.toml"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return WhatIf.load(out / "whatif.json"), out


def _result(w: WhatIf, component: str) -> Result:
    r = w.result(component, "conc8")
    assert r is not None, [(r.component, r.scenario) for r in w.results]
    return r


def test_a_slowed_component_shows_the_added_amount_in_its_own_time(experiment):
    w, _ = experiment
    r = _result(w, "schedule")
    base = r.points["0.0"].own_ms
    assert base > 0 and r.points["0.0"].added_ms == 0
    for k in SLOWDOWNS:
        point = r.points[str(k)]
        # what the plugin added meets k x the calls' own time it measured (its accuracy)
        assert point.added_ms == pytest.approx(k * point.own_ms, rel=0.15)
        # and the component's whole time per request, own plus added, is (1 + k) times what it
        # took unslowed in other runs: the load is shared with the slowed work on 2 cores, so
        # the bound is generous
        assert 0.6 * (1 + k) * base <= point.own_ms + point.added_ms <= 1.6 * (1 + k) * base
    assert abs(w.slowdown["schedule"].error_pct) < 10


def test_the_placebo_shows_nothing(experiment):
    w, _ = experiment
    assert w.placebo["conc8"].added_ms > 0  # it was slowed...
    # ...and the latency a request sees did not move. Throughput over two short repeats on
    # a shared 2-core machine swung by up to 28% (interval clear of zero) in 1 of 3 full
    # suite runs: the tool reports that as "do not conclude"; the test checks e2e p50. Its
    # 95% interval misses zero by chance now and then (seen: -13 ms, [-25, -2], on a
    # ~300 ms e2e); a placebo that really moved requests moves them by more than a tenth
    effect = w.placebo["conc8"].effects["e2e_p50"]
    base = _result(w, "schedule").metrics["e2e_p50"].base
    assert base is not None and base > 0
    assert effect.zero_inside or abs(effect.value) < 0.1 * base, (w.placebo["conc8"], base)


def test_the_back_test_holds(experiment):
    w, _ = experiment
    back = _result(w, "schedule").metrics["e2e_p50"].backtest
    assert back is not None and back.holds, back


def test_the_report_has_the_claims_and_the_controls(experiment):
    w, out = experiment
    text = (out / "whatif.md").read_text()
    assert "## The study's claims" in text and "## Placebo" in text
    assert any(c.component == "schedule" and c.effect is not None for c in w.claims)
    # version 2: every row carries its verdict, and the placebo's is on the top level
    assert w.format_version == 2 and all(c.verdict is not None for c in w.claims)
    gpu = next(c for c in w.claims if c.component == "gpu")
    assert gpu.verdict == Verdict.NOT_A_SLOWDOWN
    assert w.placebo_clean == all(p.within_noise for p in w.placebo.values())
    assert (out / "whatif.html").read_text().startswith("<!doctype html>")
