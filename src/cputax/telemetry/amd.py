"""AMD GPUs (MI300X and others) through amdsmi.

Busy % over an interval comes from the firmware's activity accumulators, not from the
instantaneous `gfx_activity`: delta(gfx_activity_acc) / delta(accumulation_counter),
the formula ROCm's RDC documents (times 100). Both counters advance on every firmware
refresh, so an interval average covers every refresh between two polls, and the gaps
between changes of `accumulation_counter` are the source's real resolution. On MI300
`xcp_stats[p].gfx_busy_acc` gives the same per XCC of each partition (XCP).

`amdsmi` from PyPI is only a wrapper: it needs ROCm's libamd_smi.so at import time and
raises KeyError or OSError (after printing) without it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from cputax.telemetry.base import (
    BusySeries,
    ChangeTracker,
    Guard,
    Power,
    Sample,
    TelemetryUnavailable,
    sample_kind,
)
from cputax.util import average

INSTALL = "pip install 'cputax[amd]' (amdsmi) and ROCm's libamd_smi.so (package amd-smi-lib)"
INVALID = {
    0xFFFF,
    0xFFFFFFFF,
    0xFFFFFFFFFFFFFFFF,
}  # amdsmi fills unsupported fields with max values


@sample_kind
class Activity(Sample, tag="activity"):
    """Busy % over t0_ns..t_ns from the activity accumulators (GFX, memory, per XCP), and
    the firmware's own average beside it for comparison."""

    t0_ns: int
    dev: int
    gfx: float | None = None
    umc: float | None = None
    xcp_gfx: list[float | None] | None = None
    avg_gfx: float | None = None
    busy_series: ClassVar[BusySeries] = BusySeries(
        field="gfx", label="amdsmi gfx activity accumulators", series="activity", rank=4
    )


@sample_kind
class ActivityAvg(Sample, tag="activity_avg"):
    """The firmware's short average (no accumulators), written on change."""

    dev: int
    gfx: float | None = None
    umc: float | None = None
    busy_series: ClassVar[BusySeries] = BusySeries(
        field="gfx",
        label="amdsmi average gfx activity",
        series="activity_avg",
        rank=5,
        covers="held",
    )


def import_amdsmi() -> Any:
    try:
        with contextlib.redirect_stdout(
            sys.stderr
        ):  # it prints its load failure; keep stdout clean
            import amdsmi
    except (ImportError, OSError, KeyError) as exc:
        raise TelemetryUnavailable(
            f"amd: amdsmi cannot load ({type(exc).__name__}: {exc})", INSTALL
        ) from exc
    return amdsmi


def value(v: Any) -> float | None:
    """A number from amdsmi, or None for "N/A", a max-value filler or a missing field."""
    if isinstance(v, dict):
        v = v.get("value")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v in INVALID:
        return None
    return v


@dataclass
class _Device:
    index: int
    handle: Any
    name: str
    prev: dict[str, Any] | None = None
    prev_ns: int = 0


class AmdPoller:
    """gfx / umc busy from accumulators (per device and per XCP), power, clocks, VRAM."""

    name = "amd"

    def __init__(self, interval_s: float = 0.02, slow_interval_s: float = 0.5, amdsmi: Any = None):
        self.interval_s = interval_s
        self.slow_interval_s = slow_interval_s
        self.amdsmi = amdsmi
        self.devices: list[_Device] = []
        self.changes = ChangeTracker()
        self.guard = Guard({})
        self.acc_scale = 100.0  # RDC's formula; 1.0 if the accumulators turn out to count percent
        self._next_slow = 0

    def open(self) -> dict[str, Any]:
        smi = self.amdsmi = self.amdsmi or import_amdsmi()
        error = getattr(smi, "AmdSmiException", Exception)
        try:
            smi.amdsmi_init(smi.AmdSmiInitFlags.INIT_AMD_GPUS)
            handles = smi.amdsmi_get_processor_handles()
        except error as exc:
            raise TelemetryUnavailable(
                f"amd: amdsmi cannot start ({exc})", "is the amdgpu driver loaded?"
            ) from exc
        if not handles:
            smi.amdsmi_shut_down()
            raise TelemetryUnavailable("amd: amdsmi found no GPU")
        for i, h in enumerate(handles):
            asic = self.guard.read("asic_info", lambda h=h: smi.amdsmi_get_gpu_asic_info(h)) or {}
            self.devices.append(_Device(i, h, str(asic.get("market_name", "AMD GPU"))))
        return {"devices": [{"index": d.index, "name": d.name} for d in self.devices]}

    def poll(self) -> list[Sample]:
        now = time.monotonic_ns()
        slow_due = now >= self._next_slow
        out: list[Sample] = []
        for dev in self.devices:
            t0 = time.monotonic_ns()
            m = self.guard.read(
                f"metrics.{dev.index}",
                lambda dev=dev: self.amdsmi.amdsmi_get_gpu_metrics_info(dev.handle),
            )
            t = (t0 + time.monotonic_ns()) // 2
            if m is None:
                out += self._activity_fallback(dev, t)
                continue
            counter = value(m.get("accumulation_counter"))
            if counter is None:
                out.append(self._average(dev, m, t))
            else:
                self.changes.observe(f"{dev.index}.activity", t, counter)
                # a snapshot's time is when its counter was first seen: until the firmware
                # refreshes, the previous snapshot stays the interval's start
                if dev.prev is not None and counter > value(dev.prev["accumulation_counter"]):
                    out.append(self._interval(dev, m, t))
                if dev.prev is None or counter != value(dev.prev["accumulation_counter"]):
                    dev.prev, dev.prev_ns = m, t
            if slow_due:
                out.append(self._slow(dev, m, t))
        if slow_due:
            self._next_slow = now + int(self.slow_interval_s * 1e9)
        return out

    def _pct(self, d_acc: float, d_count: float) -> float:
        pct = self.acc_scale * d_acc / d_count
        if (
            pct > 105.0 and self.acc_scale == 100.0
        ):  # impossible as a fraction: the counters count percent
            self.acc_scale = 1.0
            pct = d_acc / d_count
        return min(pct, 100.0)

    def _interval(self, dev: _Device, m: dict[str, Any], t: int) -> Sample:
        """Busy % between the previous read and this one, from the accumulators."""
        prev = dev.prev
        assert prev is not None
        d_count = value(m["accumulation_counter"]) - value(prev["accumulation_counter"])
        pct: dict[str, float] = {}
        for key, acc in (("gfx", "gfx_activity_acc"), ("umc", "mem_activity_acc")):
            a, b = value(prev.get(acc)), value(m.get(acc))
            if a is not None and b is not None:
                pct[key] = self._pct(b - a, d_count)
        return Activity(
            t_ns=t,
            t0_ns=dev.prev_ns,
            src="amd",
            dev=dev.index,
            **pct,
            xcp_gfx=self._xcp(prev, m, d_count) or None,
            avg_gfx=value(m.get("average_gfx_activity")),
        )

    def _xcp(self, prev: dict[str, Any], m: dict[str, Any], d_count: float) -> list[float | None]:
        """Per-partition busy %: the mean over its XCCs of each accumulator's interval average."""
        before, after = prev.get("xcp_stats") or [], m.get("xcp_stats") or []
        parts = value(m.get("num_partition"))
        out = []
        for p, (a, b) in enumerate(zip(before, after, strict=False)):
            if parts is not None and p >= parts:
                break
            pcts = [
                self._pct(y - x, d_count)
                for x, y in zip(a.get("gfx_busy_acc", []), b.get("gfx_busy_acc", []), strict=False)
                if value(x) is not None and value(y) is not None
            ]
            out.append(sum(pcts) / len(pcts) if pcts else None)
        return out if any(v is not None for v in out) else []

    def _average(self, dev: _Device, m: dict[str, Any], t: int) -> Sample:
        """No accumulators (older metrics table): the firmware's own short average."""
        sample = ActivityAvg(
            t_ns=t,
            src="amd",
            dev=dev.index,
            gfx=value(m.get("average_gfx_activity")),
            umc=value(m.get("average_umc_activity")),
        )
        if sample.gfx is not None:
            self.changes.observe(f"{dev.index}.activity_avg", t, sample.gfx)
        return sample

    def _activity_fallback(self, dev: _Device, t: int) -> list[Sample]:
        """No metrics table at all: amdsmi_get_gpu_activity (instantaneous %)."""
        act = self.guard.read(
            f"activity.{dev.index}", lambda: self.amdsmi.amdsmi_get_gpu_activity(dev.handle)
        )
        if not act:
            return []
        sample = ActivityAvg(
            t_ns=t,
            src="amd",
            dev=dev.index,
            gfx=value(act.get("gfx_activity")),
            umc=value(act.get("umc_activity")),
        )
        if sample.gfx is not None:
            self.changes.observe(f"{dev.index}.activity_avg", t, sample.gfx)
        return [sample]

    def _slow(self, dev: _Device, m: dict[str, Any], t: int) -> Sample:
        clocks = m.get("current_gfxclks")  # one per XCC where the table has them
        gfxclk = average(value(v) for v in clocks) if clocks else value(m.get("current_gfxclk"))
        vram = (
            self.guard.read("vram", lambda: self.amdsmi.amdsmi_get_gpu_vram_usage(dev.handle)) or {}
        )
        power = value(m.get("current_socket_power")) or value(m.get("average_socket_power"))
        return Power(
            t_ns=t,
            src="amd",
            dev=dev.index,
            power_w=power,
            gfx_mhz=gfxclk,
            mem_mhz=value(m.get("current_uclk")),
            vram_used_mb=value(vram.get("vram_used")),
            vram_total_mb=value(vram.get("vram_total")),
        )

    def close(self) -> dict[str, Any]:
        self.guard.read("shutdown", self.amdsmi.amdsmi_shut_down)
        floor = self.interval_s * 1e3
        series = {}
        for dev in self.devices:
            series[str(dev.index)] = {}
            for name in ("activity", "activity_avg"):
                if f"{dev.index}.{name}" in self.changes.summary():
                    ms, basis = self.changes.resolution_ms(f"{dev.index}.{name}", floor)
                    series[str(dev.index)][name] = {"resolution_ms": ms, "basis": basis}
        return {
            "devices": [{"index": d.index, "name": d.name} for d in self.devices],
            "interval_ms": floor,
            "slow_interval_ms": self.slow_interval_s * 1e3,
            "accumulator_scale": "fraction (x100)" if self.acc_scale == 100.0 else "percent",
            "alignment_ms": None,  # polled on the monotonic clock: the poll's own duration
            "series": series,
            "changes": self.changes.summary(),
            "dropped": dict(self.guard.dropped),
        }
