"""Telemetry by registration: a sample kind declared in one place is written, read back
typed, and (when it measures GPU busy) used by analysis, with no table to edit elsewhere."""

from __future__ import annotations

from typing import ClassVar

import msgspec
import pytest

from cputax.analysis.timeline import busy_sources, gpu_busy, read_telemetry, source_names
from cputax.telemetry.base import (
    KINDS,
    SOURCES,
    BusySeries,
    Sample,
    decode,
    kind_of,
    load_all,
    sample_kind,
)

MS = 1_000_000


@sample_kind
class ProbeBusy(Sample, tag="test_probe_busy"):
    """A made-up GPU source, declared only here."""

    t0_ns: int
    dev: int
    pct: float | None = None
    busy_series: ClassVar[BusySeries] = BusySeries(
        field="pct", label="probe", series="probe", rank=99
    )


def test_every_module_registers_its_kinds_and_the_emulated_gpu_its_source():
    kinds = load_all()
    assert {
        "clock",
        "power",
        "util",
        "rates",
        "gpm",
        "proc_util",
        "activity",
        "activity_avg",
        "proc",
        "proc_info",
        "thread_names",
        "system",
        "emulated",
    } <= set(kinds)
    assert "emulated" in SOURCES and SOURCES["emulated"]({}) is None  # not asked for: no poller
    assert SOURCES["emulated"]({"emulated_gpu": "/tmp/x/emulated-gpu.jsonl"}) is not None
    ranked = list(busy_sources())
    assert ranked[0] == "emulated" and ranked.index("gpm") < ranked.index("util") < ranked.index(
        "rates"
    )


def test_a_kind_round_trips_and_unknown_or_misshapen_lines_are_left_out():
    sample = ProbeBusy(t_ns=5, t0_ns=1, src="probe", dev=0, pct=40.0)
    raw = msgspec.json.decode(sample.to_json())
    assert raw["kind"] == "test_probe_busy" and "pct" in raw
    assert decode(raw) == sample
    assert decode({"kind": "from_a_newer_cputax", "t_ns": 1}) is None
    assert decode({"kind": "test_probe_busy", "t_ns": "soon", "t0_ns": 0, "dev": 0}) is None
    by_kind = read_telemetry([raw, {"kind": "from_a_newer_cputax", "t_ns": 1}])
    assert list(by_kind) == ["test_probe_busy"]


def test_a_tag_taken_twice_is_refused():
    with pytest.raises(ValueError, match="tag of its own"):

        @sample_kind
        class Again(Sample, tag="util"):
            dev: int


def test_a_new_busy_source_is_used_by_analysis_from_its_declaration_alone():
    rows = [
        ProbeBusy(
            t_ns=(i + 1) * 10 * MS,
            t0_ns=i * 10 * MS,
            src="probe",
            dev=0,
            pct=100.0 if i % 2 else 0.0,
        )
        for i in range(10)
    ]
    rows.append(ProbeBusy(t_ns=200 * MS, t0_ns=100 * MS, src="probe", dev=0))  # no value
    gpu = gpu_busy(
        read_telemetry(rows),
        {"probe": {"series": {"0": {"probe": {"resolution_ms": 10.0, "basis": "declared"}}}}},
    )
    assert gpu is not None and gpu.backend == "probe"
    intervals = gpu.intervals[(0, "test_probe_busy")]
    assert [iv.value for iv in intervals] == [0.0, 100.0] * 5
    assert gpu.resolution_ms[(0, "test_probe_busy")] == 10.0
    assert source_names()["test_probe_busy"] == "probe"


def test_the_emulated_gpu_is_exclusive_only_when_it_has_steps():
    util = [
        {"kind": "util", "t_ns": i * 100 * MS, "src": "nvidia", "dev": 0, "gpu": 50.0}
        for i in range(5)
    ]
    steps = [
        {
            "kind": "emulated",
            "t_ns": 20 * MS,
            "t0_ns": 10 * MS,
            "src": "emulated",
            "dev": 0,
            "busy": 100.0,
        }
    ]
    both = gpu_busy(read_telemetry(util + steps), {})
    assert both is not None and {k for _, k in both.intervals} == {"emulated"}
    alone = gpu_busy(read_telemetry(util), {})
    assert alone is not None and {k for _, k in alone.intervals} == {"util"}
    assert kind_of(KINDS["util"]) == "util"


def test_a_fresh_process_reads_every_kind_of_a_file():
    """Analysis in a new process (`cputax report`) knows the GPU kinds before any source
    module was imported."""
    import subprocess
    import sys

    code = (
        "from cputax.analysis.timeline import read_telemetry\n"
        "rows = [{'kind': k, 't_ns': 1, 't0_ns': 0, 'src': 's', 'dev': 0, 'gpu': 1.0,"
        " 'gfx': 1.0, 'gr_util': 1.0} for k in ('gpm', 'util', 'rates', 'activity')]\n"
        "print(sorted(read_telemetry(rows)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['activity', 'gpm', 'rates', 'util']"
