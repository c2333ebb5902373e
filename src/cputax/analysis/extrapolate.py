"""From a run's measured scenarios to concurrency nobody measured: the study's sub-agent table.

The model of the front end (time to response headers, "HTTP overhead"): a batch of c
requests of n prompt tokens arrives at once at a front end that handles one at a time
(chat template + tokenization on one thread, as vLLM's API server does). Request k
waits for the k-1 before it, so the mean time to headers is

    OH(c, n) = L + S(n) * (c + 1) / 2 * c**q,    S(n) = s0 + s1 * n

L is the fixed cost (HTTP, parse), S(n) the front end's time per request. q = 0 is the
pure queue; q > 0 says the per-request time itself grows with the requests in flight
(the same thread also streams their tokens, or shares the GIL and the cores with the
engine). Both are fitted (least squares on relative error, coefficients >= 0, q on a
grid) and the one with the smaller leave-one-out error is used. With one prompt size
measured, S is taken proportional to n.

The rest of a request (prefill + decode + stream end) and the client's own CPU
(serialize + parse) are fitted linear in n and c. CPU% is the study's ratio,
(client + OH) / total. Only scenarios whose requests arrive together (closed-loop
batches) fit the model; the others are listed as left out.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cputax.errors import CputaxError
from cputax.results.extrapolation import (
    Extrapolation,
    FitPoint,
    FrontEndModel,
    FrontEndParams,
    LeaveOneOut,
    TableRow,
)
from cputax.rundir import RunDir

Q_GRID = [i / 100 for i in range(0, 151)]
BEYOND = 2.0  # warn past this multiple of the largest measured concurrency


@dataclass
class Point:
    """One measured scenario, reduced to what the fits need (times are means in ms)."""

    name: str
    concurrency: int
    tokens: float  # prompt tokens the server counted (or the target when it did not say)
    context: int  # the scenario's target, for labels
    http_overhead: float
    client: float  # serialize + response parse
    rest: float  # total - http_overhead - client: prefill, decode, stream end
    cpu_pct: float


def points_from_run(run: RunDir) -> tuple[list[Point], list[str]]:
    """The scenarios that fit the batch model, and one line per scenario left out."""
    if not run.summary.exists():
        raise CputaxError(f"{run.path}: no summary.json; run `cputax report {run.path}` first")
    summary = run.read_summary()
    info = run.info() if run.has_info() else {}
    asked = {s["name"]: s for s in info.get("scenarios", [])}
    points, left_out = [], []
    for s in summary.scenarios:
        spec = asked.get(s.name, {})
        mean = s.mean_ms
        if spec.get("batches") is None:
            left_out.append(
                f"{s.name}: its requests do not arrive as batches (open loop, duration or replay)"
            )
            continue
        if s.withheld:  # its records break the run's invariants (analysis.invariants)
            left_out.append(f"{s.name}: {s.withheld}")
            continue
        if mean.http_overhead is None or not mean.total:
            left_out.append(f"{s.name}: no finished request")
            continue
        client = (mean.serialize or 0.0) + (mean.response_parse or 0.0)
        tokens = s.prompt_tokens_mean or s.context_tokens
        points.append(
            Point(
                s.name,
                int(s.concurrency),
                float(tokens),
                int(s.context_tokens),
                mean.http_overhead,
                client,
                mean.total - mean.http_overhead - client,
                s.cpu_pct,
            )
        )
    return points, left_out


# --- least squares on relative error ---------------------------------------------------------


def _solve(rows: list[list[float]], y: list[float]) -> list[float] | None:
    """Least squares by the normal equations (columns scaled), None when singular."""
    k = len(rows[0])
    scale = [max(abs(r[j]) for r in rows) or 1.0 for j in range(k)]
    x = [[r[j] / scale[j] for j in range(k)] for r in rows]
    a = [
        [sum(xi[i] * xi[j] for xi in x) for j in range(k)]
        + [sum(xi[i] * yi for xi, yi in zip(x, y, strict=True))]
        for i in range(k)
    ]
    for col in range(k):
        pivot = max(range(col, k), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12 * max(1.0, max(abs(v) for v in a[pivot])):
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(k):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [v - f * w for v, w in zip(a[r], a[col], strict=True)]
    return [a[i][k] / a[i][i] / scale[i] for i in range(k)]


def _relative_fit(
    features: Sequence[Callable[[Point], float]],
    points: list[Point],
    target: Callable[[Point], float],
    nonnegative: bool,
) -> tuple[list[float], float] | None:
    """Coefficients minimizing the squared relative error, and that error (None if not solvable)."""
    usable = [p for p in points if target(p) > 0]
    if len(usable) < len(features):
        return None
    rows = [[f(p) / target(p) for f in features] for p in usable]
    beta = _solve(rows, [1.0] * len(usable))
    if beta is None or (nonnegative and any(b < 0 for b in beta)):
        return None
    sse = sum(
        (sum(b * f(p) for b, f in zip(beta, features, strict=True)) / target(p) - 1) ** 2
        for p in usable
    )
    return beta, sse


def _rel_errors(
    predict: Callable[[Point], float], points: list[Point], target: Callable[[Point], float]
) -> list[float]:
    return [predict(p) / target(p) - 1 for p in points if target(p) > 0]


def _rms(values: list[float]) -> float | None:
    return (sum(v * v for v in values) / len(values)) ** 0.5 if values else None


# --- the front-end model ----------------------------------------------------------------------


@dataclass
class FrontEnd:
    """OH(c, n) = L + (s0 + s1 * n) * (c + 1) / 2 * c**q, in ms."""

    L: float
    s0: float
    s1: float
    q: float
    proportional: bool  # one prompt size measured: S(n) = s1 * n

    def service_ms(self, n: float) -> float:
        return self.s0 + self.s1 * n

    def __call__(self, c: float, n: float) -> float:
        return self.L + self.service_ms(n) * (c + 1) / 2 * c**self.q


def _fit_front_end(points: list[Point], qs: list[float]) -> tuple[FrontEnd, float] | None:
    proportional = len({round(p.tokens) for p in points}) < 2

    def load(q: float) -> Callable[[Point], float]:
        return lambda p: (p.concurrency + 1) / 2 * p.concurrency**q

    best: tuple[FrontEnd, float] | None = None
    for q in qs:
        b = load(q)
        named: dict[str, Callable[[Point], float]] = {
            "L": lambda p: 1.0,
            "s1": lambda p, b=b: p.tokens * b(p),
        }
        if not proportional:
            named["s0"] = b
        for size in range(1, len(named) + 1):
            for names in itertools.combinations(named, size):
                if names == ("L",):
                    continue
                fit = _relative_fit(
                    [named[k] for k in names], points, lambda p: p.http_overhead, nonnegative=True
                )
                if fit is None:
                    continue
                coef = dict.fromkeys(("L", "s0", "s1"), 0.0) | dict(zip(names, fit[0], strict=True))
                if best is None or fit[1] < best[1] - 1e-12:
                    best = (FrontEnd(coef["L"], coef["s0"], coef["s1"], q, proportional), fit[1])
    return best


def _loo(points: list[Point], qs: list[float]) -> float | None:
    """Leave-one-out RMS relative error: how well the model predicts a scenario it did not see."""
    if len(points) < 4:
        return None
    errors = []
    for i, held in enumerate(points):
        rest = points[:i] + points[i + 1 :]
        if len({p.concurrency for p in rest}) < 2:
            return None
        fit = _fit_front_end(rest, qs)
        if fit is None:
            return None
        errors.append(fit[0](held.concurrency, held.tokens) / held.http_overhead - 1)
    return _rms(errors)


def _linear(
    points: list[Point], target: Callable[[Point], float]
) -> tuple[Callable[[float, float], float], list[str]]:
    """target ~ a + b * n + d * c over the measured points; terms without spread are left out."""
    terms: dict[str, Callable[[Point], float]] = {"1": lambda p: 1.0}
    if len({round(p.tokens) for p in points}) > 1:
        terms["n"] = lambda p: p.tokens
    if len({p.concurrency for p in points}) > 1:
        terms["c"] = lambda p: float(p.concurrency)
    names = list(terms)
    coef = {"1": sum(target(p) for p in points) / len(points)}  # no fit at all: the mean
    while names:
        fit = _relative_fit([terms[k] for k in names], points, target, nonnegative=False)
        if fit is not None:
            coef = dict(zip(names, fit[0], strict=True))
            break
        names.pop()
    a, b, d = coef.get("1", 0.0), coef.get("n", 0.0), coef.get("c", 0.0)
    return (lambda c, n: max(0.0, a + b * n + d * c)), [
        f"{v:.4g}{'' if k == '1' else ' * ' + k}" for k, v in coef.items()
    ]


# --- the command -------------------------------------------------------------------------------


def extrapolate(
    points: list[Point], users: list[int], subagents: list[int], context: int | None = None
) -> Extrapolation:
    if len({p.concurrency for p in points}) < 2:
        raise CputaxError(
            "extrapolation needs scenarios at two or more concurrency levels (closed-loop "
            "batches), e.g. `cputax run --profile smoke`"
        )
    queue = _fit_front_end(points, [0.0])
    contention = _fit_front_end(points, Q_GRID)
    if queue is None or contention is None:
        raise CputaxError("the front-end model could not be fitted to these scenarios")
    loo = {"queue": _loo(points, [0.0]), "queue_contention": _loo(points, Q_GRID)}
    use_contention = (
        loo["queue"] is not None
        and loo["queue_contention"] is not None
        and loo["queue_contention"] < loo["queue"]
    )
    model = contention[0] if use_contention else queue[0]
    client, client_terms = _linear(points, lambda p: p.client)
    rest, rest_terms = _linear(points, lambda p: p.rest)

    def cpu_pct(c: float, n: float) -> float:
        oh, cl = model(c, n), client(c, n)
        total = oh + cl + rest(c, n)
        return 100.0 * (oh + cl) / total if total else 0.0

    max_c = max(p.concurrency for p in points)
    max_n = max(p.tokens for p in points)
    if context is None:
        busy = [p for p in points if p.concurrency > 1] or points
        context = max(p.context for p in busy)
    oh_errors = _rel_errors(
        lambda p: model(p.concurrency, p.tokens), points, lambda p: p.http_overhead
    )
    cpu_errors = [cpu_pct(p.concurrency, p.tokens) - p.cpu_pct for p in points]
    warnings = []
    if context > 2 * max_n:
        warnings.append(
            f"{context:,} prompt tokens is over twice the largest measured ({max_n:,.0f}): "
            "S(n) is extrapolated too"
        )
    rows = []
    for u, k in sorted(
        itertools.product(users, subagents), key=lambda uk: (uk[0] * (1 + uk[1]), uk)
    ):
        c = u * (1 + k)
        rows.append(
            TableRow(
                users=u,
                subagents=k,
                concurrency=c,
                http_overhead_ms=model(c, context),
                cpu_pct=cpu_pct(c, context),
                measured_range=c <= max_c,
                beyond=c > BEYOND * max_c,
            )
        )
    if any(r.beyond for r in rows):
        warnings.append(
            f"rows marked ⚠ ask for more than {BEYOND:g}x the largest measured concurrency "
            f"({max_c}): the model is extrapolated far past the data; measure there to trust it"
        )
    params = FrontEndParams(
        L_ms=model.L,
        s0_ms=model.s0,
        s1_us_per_token=1000 * model.s1,
        q=model.q,
        service_ms_at_context=model.service_ms(context),
        proportional_to_tokens=model.proportional,
    )
    loo_pct = {k: None if v is None else 100 * v for k, v in loo.items()}
    return Extrapolation(
        model=FrontEndModel(
            name="queue with contention" if use_contention else "queue",
            formula="OH(c, n) = L + (s0 + s1*n) * (c+1)/2 * c^q",
            params=params,
            fit_rms_pct=100 * (_rms(oh_errors) or 0.0),
            fit_max_pct=100 * max(abs(e) for e in oh_errors),
            loo_rms_pct=LeaveOneOut(**loo_pct),
            alternative_q=contention[0].q,
        ),
        client_ms=" + ".join(client_terms),
        rest_ms=" + ".join(rest_terms),
        cpu_fit_rms_points=_rms(cpu_errors),
        points=[
            FitPoint(
                name=p.name,
                concurrency=p.concurrency,
                prompt_tokens=p.tokens,
                http_overhead_ms=p.http_overhead,
                fitted_ms=model(p.concurrency, p.tokens),
                cpu_pct=p.cpu_pct,
                fitted_cpu_pct=cpu_pct(p.concurrency, p.tokens),
            )
            for p in points
        ],
        context_tokens=context,
        max_measured_concurrency=max_c,
        table=rows,
        warnings=warnings,
    )
