"""What the study claimed, and what this server shows: one row per claim, from a sweep's
configurations (analysis.sweep). Each row has the numbers, their spread where there is
one, and one plain sentence; a claim the data cannot decide says so and says why.

The study (../shared/seed) claimed, without measuring them:
- "scheduling + queue wait is 94% of the CPU overhead";
- that scheduling pipelined with GPU execution (async scheduling) would help;
- "move tokenization off the main event loop";
- "the GIL is the elephant in the room";
- "LMCache hashing is negligible".
"""

from __future__ import annotations

from typing import Any

from cputax.results.sweep import Claim, ConfigScenario, Configuration, Sweep

__all__ = [
    "CLAIMS",
    "GIL_WAIT_LONG",
    "HASHING_NEGLIGIBLE_PCT",
    "LOOP_WAITS_X",
    "MIN_SAMPLES",
    "STUDY_FLOOR_PCT",
    "claims",
]

MIN_SAMPLES = 100  # of the engine loop thread: fewer and a share of a few percent is noise
LOOP_WAITS_X = 5  # the loop waits this many times its scheduling time: scheduling is no limit
GIL_WAIT_LONG = 0.05  # a thread's estimated GIL wait from this share of its time is a finding
HASHING_NEGLIGIBLE_PCT = 2.0  # prefix hashing under this share of EngineCore busy time

CLAIMS = {
    "scheduling": "scheduling + queue wait is 94% of the CPU overhead",
    "async_scheduling": (
        "pipelining scheduling with GPU execution (async scheduling) removes the overhead"
    ),
    "tokenization": "move tokenization off the main event loop",
    "gil": "the GIL is the elephant in the room",
    "hashing": "(LMCache) prefix hashing is negligible",
    "cpu_floor": "even an infinitely fast GPU recovers only 85-90%: the CPU sets a floor",
}
STUDY_FLOOR_PCT = (10.0, 15.0)  # what an infinitely fast GPU leaves, by the study's claim


def _heaviest(config: Configuration) -> tuple[str, ConfigScenario] | None:
    """The scenario with the most concurrency (then the longest prompts): where a CPU limit
    shows first."""
    if not config.scenarios:
        return None
    name = max(
        config.scenarios,
        key=lambda n: (
            config.scenarios[n].concurrency or 0,
            config.scenarios[n].context_tokens or 0,
        ),
    )
    return name, config.scenarios[name]


def _value(scenario: ConfigScenario, key: str) -> float | None:
    return scenario.metrics[key].value


def _spread(scenario: ConfigScenario, key: str) -> float | None:
    return scenario.metrics[key].spread


def _row(
    key: str, finding: str, sentence: str, decided: bool, spread: str | None = None, **data: Any
) -> Claim:
    return Claim(
        claim=key,
        study=CLAIMS[key],
        finding=finding,
        spread=spread,
        sentence=sentence,
        decided=decided,
        data=data,
    )


def _varied(configs: list[Configuration], flag: str) -> dict[str, Configuration]:
    """Configurations by their value of `flag` (only when the sweep varied it)."""
    out = {}
    for c in configs:
        for part in c.name.split(","):
            f, _, v = part.partition("=")
            if f == flag and c.scenarios:
                out[v] = c
    return out if len(out) >= 2 else {}


def _beyond(a: float | None, b: float | None, sa: float | None, sb: float | None) -> str:
    if a is None or b is None:
        return "absent"
    noise = max((s for s in (sa, sb) if s is not None), default=None)
    if noise is None:
        return "no spread measure (repeat the sweep)"
    return "inside the run-to-run spread" if abs(b - a) <= noise else "beyond the run-to-run spread"


def scheduling(base: Configuration) -> Claim:
    heaviest = _heaviest(base)
    loop = heaviest[1].engine_loop if heaviest else None
    if loop is None:
        return _row(
            "scheduling",
            "absent",
            "No py-spy data of the engine loop: run the sweep with py-spy "
            "(it is on by default) against a server on this host.",
            False,
        )
    name, scenario = heaviest
    if loop.samples < MIN_SAMPLES:
        return _row(
            "scheduling",
            f"{name}: {loop.samples} samples of the engine loop",
            "Too few samples to tell a few percent of scheduling from noise (fewer than "
            f"{MIN_SAMPLES}): lengthen the scenarios (duration_s) or raise --pyspy-rate.",
            False,
        )
    queue = _value(scenario, "queue_ms")
    finding = (
        f"{name}: engine loop {100 * loop.schedule:.1f}% scheduling + KV cache, "
        f"{100 * loop.worker_wait:.0f}% waiting for the model step; server queue "
        + ("absent" if queue is None else f"{queue:,.0f} ms")
    )
    if loop.worker_wait > LOOP_WAITS_X * max(loop.schedule, 1e-9):
        sentence = (
            "Not supported: the scheduler's own CPU is a few percent of the engine loop, which "
            "spends most of its time waiting for the model step; the queue time is requests "
            "waiting for batch capacity, not for scheduler CPU."
        )
    else:
        sentence = (
            "Partly: scheduling is a sizeable share of the engine loop here; compare it with the "
            "queue time before calling it the bottleneck."
        )
    return _row(
        "scheduling",
        finding,
        sentence,
        True,
        schedule=loop.schedule,
        worker_wait=loop.worker_wait,
        queue_ms=queue,
    )


def async_scheduling(configs: list[Configuration], notes: dict[str, str]) -> Claim:
    by_value = _varied(configs, "async-scheduling")
    note = notes.get("async-scheduling")
    if not by_value:
        return _row(
            "async_scheduling",
            "not varied",
            "This sweep did not vary async-scheduling "
            "(`--vary async-scheduling`): the data cannot decide.",
            False,
        )
    on, off = by_value.get("on"), by_value.get("off")
    if on is None or off is None:
        return _row(
            "async_scheduling",
            "not varied",
            "async-scheduling needs an on and an off configuration.",
            False,
        )
    heaviest = _heaviest(off)
    assert heaviest is not None  # _varied keeps measured configurations only
    name = heaviest[0]
    a, b = off.scenarios[name], on.scenarios.get(name)
    if b is None:
        return _row(
            "async_scheduling", "absent", f"{name} did not run with async scheduling on.", False
        )
    ia, ib = _value(a, "itl_ms"), _value(b, "itl_ms")
    verdict = _beyond(ia, ib, _spread(a, "itl_ms"), _spread(b, "itl_ms"))
    finding = (
        f"{name}: time between tokens off {ia:,.1f} ms, on {ib:,.1f} ms"
        if ia is not None and ib is not None
        else "absent"
    )
    cpu_backend = any(c.target is not None and c.target.kind == "embedded" for c in (on, off))
    if cpu_backend and note:
        return _row(
            "async_scheduling",
            finding,
            f"Cannot decide here: {note}. The difference measured is {verdict}.",
            False,
            spread=verdict,
            off_ms=ia,
            on_ms=ib,
        )
    return _row(
        "async_scheduling",
        finding,
        f"The change in time between tokens is {verdict}.",
        True,
        spread=verdict,
        off_ms=ia,
        on_ms=ib,
    )


def tokenization(configs: list[Configuration], base: Configuration) -> Claim:
    heaviest = _heaviest(base)
    roles = heaviest[1].roles if heaviest else {}
    api = roles.get("api_server", {})
    if not api or heaviest is None:
        return _row(
            "tokenization",
            "absent",
            "No py-spy data of the API server: the data cannot decide.",
            False,
        )
    name, scenario = heaviest
    finding = (
        f"{name}: API server tokenize {api.get('tokenize', 0):.1f}% of a core, "
        f"sse {api.get('sse', 0):.1f}%"
    )
    sentence = (
        "vLLM already tokenizes off the event loop (its renderer pool); what is left on the loop "
        "is streaming (sse), HTTP and detokenizing."
    )
    two = _varied(configs, "api-server-count")
    data: dict[str, Any] = {"tokenize_pct_of_core": api.get("tokenize", 0.0)}
    spread = None
    if "1" in two and "2" in two:
        a, b = two["1"].scenarios.get(name), two["2"].scenarios.get(name)
        if a and b:
            ha, hb = _value(a, "http_overhead_ms"), _value(b, "http_overhead_ms")
            ta, tb = _value(a, "output_tokens_per_s"), _value(b, "output_tokens_per_s")
            spread = _beyond(ha, hb, _spread(a, "http_overhead_ms"), _spread(b, "http_overhead_ms"))
            finding += (
                f"; a second API server: time to headers {ha:,.1f} -> {hb:,.1f} ms, "
                f"throughput {ta:,.0f} -> {tb:,.0f} tok/s"
                if None not in (ha, hb, ta, tb)
                else ""
            )
            sentence += f" A second API server changed the time to headers by an amount {spread}."
            data.update(http_overhead_ms=[ha, hb], output_tokens_per_s=[ta, tb])
    return _row("tokenization", finding, sentence, True, spread=spread, **data)


def gil(base: Configuration) -> Claim:
    heaviest = _heaviest(base)
    rows = heaviest[1].gil if heaviest else []
    if not rows or heaviest is None:
        return _row("gil", "absent", "No GIL data: run the sweep with --pyspy-gil.", False)
    name = heaviest[0]
    worst = max(rows, key=lambda r: r.wait or 0.0)
    loop = next((r for r in rows if r.role == "api_server" and r.thread == "MainThread"), None)
    finding = (
        f"{name}: the longest estimated GIL wait is {100 * (worst.wait or 0):.1f}% "
        f"({worst.process} {worst.thread})"
    )
    parts = []
    if loop is not None:
        finding += (
            f"; the event loop holds it {100 * (loop.held or 0):.0f}% of the time, "
            f"busy {100 * (loop.busy or 0):.0f}%"
        )
        if loop.in_idle_frames:
            frames = ", ".join(f"`{f}`" for f, _ in loop.idle_frames[:2])
            parts.append(
                f"{100 * loop.in_idle_frames:.0f}% of the event loop's GIL samples are "
                f"in frames the rules call idle ({frames}): the loop written in C holds "
                "the GIL while it dispatches"
            )
    decided = worst.wait is not None
    verdict = (
        "Not here: no thread waits long for the GIL; each process has its own."
        if decided and (worst.wait or 0) < GIL_WAIT_LONG
        else "Yes for the thread named: it waits for the GIL a large share of its time."
        if decided
        else "Needs host telemetry per thread to estimate the wait."
    )
    return _row(
        "gil",
        finding,
        " ".join([verdict, *[p + "." for p in parts]]),
        decided,
        worst_wait=worst.wait,
        event_loop_held=loop.held if loop else None,
    )


def hashing(configs: list[Configuration], base: Configuration) -> Claim:
    by_algo = _varied(configs, "prefix-caching-hash-algo") or {"sha256 (vLLM's default)": base}
    shares = {}
    for algo, config in by_algo.items():
        heaviest = _heaviest(config)
        if heaviest:
            shares[algo] = (heaviest[0], _value(heaviest[1], "prefix_hash_share"))
    known = {a: v for a, (_, v) in shares.items() if v is not None}
    if not known:
        return _row(
            "hashing", "absent", "No py-spy data of the EngineCore: the data cannot decide.", False
        )
    finding = "; ".join(
        f"{algo}: {share:.1f}% of EngineCore busy time" for algo, share in known.items()
    )
    biggest = max(known.values())
    sentence = (
        "Supported here: block hashing is a small share of the EngineCore's busy time."
        if biggest < HASHING_NEGLIGIBLE_PCT
        else "Not negligible here: block hashing is a visible share of the EngineCore's time."
    )
    return _row("hashing", finding, sentence, True, shares=known)


def cpu_floor(configs: list[Configuration]) -> Claim:
    """`--vary gpu-speed=1,...,inf` on the emulated GPU: per scenario, the share of a request's
    time left when the GPU takes none (the CPU floor)."""
    by_value = {k.lower(): v for k, v in _varied(configs, "gpu-speed").items()}
    base = next((by_value[k] for k in ("1", "1.0") if k in by_value), None)
    floor = next((by_value[k] for k in ("inf", "infinity") if k in by_value), None)
    if base is None or floor is None:
        return _row(
            "cpu_floor",
            "not varied",
            "This sweep did not run the emulated GPU at speed 1 "
            "and inf (`--vary gpu-speed=1,4,inf`): the data cannot decide.",
            False,
        )
    shares = {}
    for name, a in base.scenarios.items():
        b = floor.scenarios.get(name)
        ta, tb = _value(a, "total_ms"), _value(b, "total_ms") if b else None
        if ta and tb is not None:
            shares[name] = 100.0 * tb / ta
    if not shares:
        return _row("cpu_floor", "absent", "No scenario finished at both speeds.", False)
    heaviest = _heaviest(base)
    name = heaviest[0] if heaviest and heaviest[0] in shares else max(shares, key=shares.get)
    finding = "; ".join(f"{n}: {s:.0f}% left" for n, s in shares.items())
    lo, hi = STUDY_FLOOR_PCT
    left = shares[name]
    verdict = (
        "as the study says"
        if lo <= left <= hi
        else ("a higher floor than the study's" if left > hi else "a lower floor than the study's")
    )
    sentence = (
        f"At {name}, an infinitely fast GPU leaves {left:.0f}% of a request's time "
        f"(it recovers {100 - left:.0f}%): {verdict} "
        f"({100 - hi:.0f}-{100 - lo:.0f}% recovered). "
        "The rest is the CPU side of this machine: front end, engine loop, worker, client."
    )
    return _row("cpu_floor", finding, sentence, True, left_pct=shares)


def claims(info: Sweep, configs: list[Configuration]) -> list[Claim]:
    base = next((c for c in configs if c.scenarios), None)
    if base is None:
        return [_row(key, "absent", "No configuration was measured.", False) for key in CLAIMS]
    notes = info.notes
    return [
        scheduling(base),
        async_scheduling(configs, notes),
        tokenization(configs, base),
        gil(base),
        hashing(configs, base),
        cpu_floor(configs),
    ]
