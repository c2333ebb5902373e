"""NVIDIA GPUs through NVML (the `nvidia-ml-py` package, module `pynvml`).

What NVML really resolves (measured on an H200, ../shared/notes/telemetry-and-profiling.md):
- nvmlDeviceGetSamples: the driver's own utilization samples, each stamped with a CPU
  wall-clock time in µs, one every ~200 ms. Polling fetches only the newer ones.
  They can be missing while the GPU idles, so utilization rates fill the gaps.
- nvmlDeviceGetUtilizationRates: a sliding average over 1/6 s to 1 s; cheap to read,
  but its value changes only a few times a second.
- GPM SM utilization (Hopper and later): the metric between two samples; the counters
  behind it move about every 100 ms, so windows shorter than that read 0 or ~100.
Power, clocks and memory change slowly and are read at the slow interval, as is
per-process utilization.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import pairwise
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

INSTALL = "pip install 'cputax[nvidia]' (nvidia-ml-py)"
GPM_FLOOR_S = 0.1  # GPM counters move about every 100 ms: never window them finer
RATES_FLOOR_MS = 167.0  # utilization rates average over at least 1/6 s
SAMPLES_FLOOR_MS = 100.0  # until the driver's own sample period is seen
RATES_HEARTBEAT_NS = 1_000_000_000  # rates are written on change, and at least this often
# graphics util = % of time any kernel ran (the "busy" that stall detection needs); SM util
# and occupancy say how full the GPU was while busy
GPM_METRICS = {
    "gr_util": "NVML_GPM_METRIC_GRAPHICS_UTIL",
    "sm_util": "NVML_GPM_METRIC_SM_UTIL",
    "sm_occupancy": "NVML_GPM_METRIC_SM_OCCUPANCY",
    "tensor_util": "NVML_GPM_METRIC_ANY_TENSOR_UTIL",
    "dram_bw_util": "NVML_GPM_METRIC_DRAM_BW_UTIL",
}


@sample_kind
class Gpm(Sample, tag="gpm"):
    """GPM metrics (%) over the window t0_ns..t_ns; a metric the GPU lacks is None."""

    t0_ns: int
    dev: int
    gr_util: float | None = None
    sm_util: float | None = None
    sm_occupancy: float | None = None
    tensor_util: float | None = None
    dram_bw_util: float | None = None
    busy_series: ClassVar[BusySeries] = BusySeries(
        field="gr_util", label="NVML GPM graphics util", series="gpm", rank=1
    )


@sample_kind
class Util(Sample, tag="util"):
    """One of the driver's own utilization samples (% busy since the one before)."""

    dev: int
    gpu: float
    busy_series: ClassVar[BusySeries] = BusySeries(
        field="gpu",
        label="NVML utilization samples",
        series="samples",
        rank=2,
        covers="since_previous",
    )


@sample_kind
class Rates(Sample, tag="rates"):
    """Utilization rates (a sliding average), written on change."""

    dev: int
    gpu: float
    mem: float | None = None
    busy_series: ClassVar[BusySeries] = BusySeries(
        field="gpu", label="NVML utilization rates", series="rates", rank=3, covers="held"
    )


@sample_kind
class ProcUtil(Sample, tag="proc_util"):
    """A process's SM and memory utilization, as the driver reports it."""

    dev: int
    pid: int
    sm: float
    mem: float


def import_nvml() -> Any:
    try:
        import pynvml
    except ImportError as exc:
        raise TelemetryUnavailable("nvidia: nvidia-ml-py is not installed", INSTALL) from exc
    return pynvml


@dataclass
class WallClock:
    """Converts NVML's wall-clock µs stamps to the run's monotonic ns, with the error of doing
    so."""

    offset_ns: int = 0  # time_ns - monotonic_ns
    error_ns: int = 0

    @classmethod
    def measure(cls) -> WallClock:
        m0 = time.monotonic_ns()
        wall = time.time_ns()
        m1 = time.monotonic_ns()
        return cls(wall - (m0 + m1) // 2, (m1 - m0) // 2 + 1)

    def to_monotonic(self, wall_us: int) -> int:
        return wall_us * 1000 - self.offset_ns


@dataclass
class _Device:
    index: int
    handle: Any
    name: str
    uuid: str | None
    gpm: bool
    last_sample_us: int = 0
    last_proc_us: int = 0
    sample_stamps: list[int] = field(default_factory=list)  # driver µs of recent samples
    last_rates: tuple[int, int] | None = None
    last_rates_ns: int = 0
    gpm_prev: Any = None
    gpm_prev_ns: int = 0
    gpm_next: Any = None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvidiaPoller:
    """Utilization samples, utilization rates, GPM, power, clocks, memory, per-process use."""

    name = "nvidia"

    def __init__(self, interval_s: float = 0.02, slow_interval_s: float = 0.5, nvml: Any = None):
        self.interval_s = interval_s
        self.slow_interval_s = slow_interval_s
        self.gpm_interval_s = max(interval_s, GPM_FLOOR_S)
        self.nvml = nvml
        self.devices: list[_Device] = []
        self.changes = ChangeTracker()
        self.guard = Guard({})
        self.clock = WallClock()
        self._next_slow = 0
        self._next_gpm = 0

    def open(self) -> dict[str, Any]:
        nvml = self.nvml = self.nvml or import_nvml()
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise TelemetryUnavailable(
                f"nvidia: NVML cannot start ({exc})",
                "install the NVIDIA driver (libnvidia-ml.so.1)",
            ) from exc
        count = nvml.nvmlDeviceGetCount()
        if not count:
            nvml.nvmlShutdown()
            raise TelemetryUnavailable("nvidia: NVML found no GPU")
        for i in range(count):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            uuid = self.guard.read("uuid", lambda h=h: _text(nvml.nvmlDeviceGetUUID(h)))
            dev = _Device(i, h, _text(nvml.nvmlDeviceGetName(h)), uuid, self._gpm_supported(h))
            if dev.gpm:
                try:
                    dev.gpm_prev, dev.gpm_next = (
                        nvml.nvmlGpmSampleAlloc(),
                        nvml.nvmlGpmSampleAlloc(),
                    )
                    dev.gpm_prev_ns = self._gpm_sample(dev, dev.gpm_prev)
                except nvml.NVMLError as exc:
                    dev.gpm = False
                    self.guard.dropped[f"gpm.{i}"] = f"{type(exc).__name__}: {exc}"
            self.devices.append(dev)
        self.clock = WallClock.measure()
        driver = self.guard.read("driver", lambda: _text(nvml.nvmlSystemGetDriverVersion()))
        return {"driver": driver, "devices": [self._describe(d) for d in self.devices]}

    def _gpm_supported(self, handle: Any) -> bool:
        if not hasattr(self.nvml, "nvmlGpmQueryDeviceSupport"):
            return False  # an nvidia-ml-py older than GPM
        support = self.guard.read(
            "gpm_support", lambda: self.nvml.nvmlGpmQueryDeviceSupport(handle)
        )
        return bool(support and support.isSupportedDevice)

    def _gpm_sample(self, dev: _Device, sample: Any) -> int:
        t0 = time.monotonic_ns()
        self.nvml.nvmlGpmSampleGet(dev.handle, sample)
        return (t0 + time.monotonic_ns()) // 2

    @staticmethod
    def _describe(d: _Device) -> dict[str, Any]:
        return {"index": d.index, "name": d.name, "uuid": d.uuid, "gpm": d.gpm}

    def poll(self) -> list[Sample]:
        now = time.monotonic_ns()
        out: list[Sample] = []
        gpm_due, slow_due = now >= self._next_gpm, now >= self._next_slow
        for dev in self.devices:
            out += self._samples(dev)
            out += self._rates(dev, now)
            if dev.gpm and gpm_due:
                out += self._gpm(dev)
            if slow_due:
                out += self._slow(dev, now)
        if gpm_due:
            self._next_gpm = now + int(self.gpm_interval_s * 1e9)
        if slow_due:
            self._next_slow = now + int(self.slow_interval_s * 1e9)
        return out

    def _samples(self, dev: _Device) -> list[Sample]:
        """The driver's buffered utilization samples newer than the last one seen."""
        nvml = self.nvml
        if "samples" in self.guard.dropped:
            return []
        try:
            _, samples = nvml.nvmlDeviceGetSamples(
                dev.handle, nvml.NVML_GPU_UTILIZATION_SAMPLES, dev.last_sample_us
            )
        except nvml.NVMLError as exc:
            if (
                getattr(exc, "value", None) != nvml.NVML_ERROR_NOT_FOUND
            ):  # NOT_FOUND: none new (idle)
                self.guard.dropped["samples"] = f"{type(exc).__name__}: {exc}"
            return []
        out = []
        for s in sorted(samples, key=lambda s: s.timeStamp):
            if s.timeStamp <= dev.last_sample_us:
                continue
            t = self.clock.to_monotonic(s.timeStamp)
            value = s.sampleValue.uiVal
            out.append(Util(t_ns=t, src="nvidia", dev=dev.index, gpu=value))
            self.changes.observe(f"{dev.index}.samples", t, value)
            dev.last_sample_us = s.timeStamp
            dev.sample_stamps = (dev.sample_stamps + [s.timeStamp])[-512:]
        return out

    def _rates(self, dev: _Device, now: int) -> list[Sample]:
        u = self.guard.read("rates", lambda: self.nvml.nvmlDeviceGetUtilizationRates(dev.handle))
        if u is None:
            return []
        rates = (u.gpu, u.memory)
        self.changes.observe(f"{dev.index}.rates", now, u.gpu)
        if rates == dev.last_rates and now - dev.last_rates_ns < RATES_HEARTBEAT_NS:
            return []
        dev.last_rates, dev.last_rates_ns = rates, now
        return [Rates(t_ns=now, src="nvidia", dev=dev.index, gpu=u.gpu, mem=u.memory)]

    def _gpm(self, dev: _Device) -> list[Sample]:
        nvml = self.nvml
        try:
            t = self._gpm_sample(dev, dev.gpm_next)
            mg = nvml.c_nvmlGpmMetricsGet_t()
            mg.version = nvml.NVML_GPM_METRICS_GET_VERSION
            metrics = {
                key: getattr(nvml, const)
                for key, const in GPM_METRICS.items()
                if hasattr(nvml, const)
            }
            mg.numMetrics = len(metrics)
            mg.sample1, mg.sample2 = dev.gpm_prev, dev.gpm_next
            for i, metric_id in enumerate(metrics.values()):
                mg.metrics[i].metricId = metric_id
            nvml.nvmlGpmMetricsGet(mg)
        except nvml.NVMLError as exc:
            dev.gpm = False
            self.guard.dropped[f"gpm.{dev.index}"] = f"{type(exc).__name__}: {exc}"
            return []
        values = {
            key: float(mg.metrics[i].value)
            for i, key in enumerate(metrics)
            if getattr(mg.metrics[i], "nvmlReturn", 0) == 0
        }
        sample = Gpm(t_ns=t, t0_ns=dev.gpm_prev_ns, src="nvidia", dev=dev.index, **values)
        if sample.gr_util is not None:
            self.changes.observe(f"{dev.index}.gpm", t, round(sample.gr_util))
        dev.gpm_prev, dev.gpm_next, dev.gpm_prev_ns = dev.gpm_next, dev.gpm_prev, t
        return [sample]

    def _slow(self, dev: _Device, now: int) -> list[Sample]:
        nvml, read, h = self.nvml, self.guard.read, dev.handle
        mw = read("power", lambda: nvml.nvmlDeviceGetPowerUsage(h))
        mem = read("memory", lambda: nvml.nvmlDeviceGetMemoryInfo(h))
        sample = Power(
            t_ns=now,
            src="nvidia",
            dev=dev.index,
            power_w=None if mw is None else mw / 1000.0,
            sm_mhz=read("sm_clock", lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM)),
            mem_mhz=read("mem_clock", lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM)),
            mem_used_mb=None if mem is None else mem.used / 2**20,
            mem_total_mb=None if mem is None else mem.total / 2**20,
        )
        return [sample, *self._process_util(dev)]

    def _process_util(self, dev: _Device) -> list[Sample]:
        nvml = self.nvml
        if "process_util" in self.guard.dropped:
            return []
        try:
            procs = nvml.nvmlDeviceGetProcessUtilization(dev.handle, dev.last_proc_us)
        except nvml.NVMLError as exc:
            if (
                getattr(exc, "value", None) != nvml.NVML_ERROR_NOT_FOUND
            ):  # NOT_FOUND: no process ran
                self.guard.dropped["process_util"] = f"{type(exc).__name__}: {exc}"
            return []
        out = []
        for p in procs:
            if p.timeStamp <= dev.last_proc_us:
                continue
            out.append(
                ProcUtil(
                    t_ns=self.clock.to_monotonic(p.timeStamp),
                    src="nvidia",
                    dev=dev.index,
                    pid=p.pid,
                    sm=p.smUtil,
                    mem=p.memUtil,
                )
            )
        dev.last_proc_us = max([dev.last_proc_us] + [p.timeStamp for p in procs])
        return out

    def close(self) -> dict[str, Any]:
        nvml = self.nvml
        end = WallClock.measure()
        drift_ns = abs(end.offset_ns - self.clock.offset_ns)
        for dev in self.devices:
            for s in (dev.gpm_prev, dev.gpm_next):
                if s is not None:
                    self.guard.read("gpm_free", lambda s=s: nvml.nvmlGpmSampleFree(s))
        self.guard.read("shutdown", nvml.nvmlShutdown)
        return {
            "devices": [self._describe(d) for d in self.devices],
            "interval_ms": self.interval_s * 1e3,
            "gpm_interval_ms": self.gpm_interval_s * 1e3,
            "slow_interval_ms": self.slow_interval_s * 1e3,
            # NVML stamps are wall clock: the conversion's error, plus any NTP step during the run
            "alignment_ms": (self.clock.error_ns + drift_ns) / 1e6,
            "series": {str(d.index): self._resolutions(d) for d in self.devices},
            "changes": self.changes.summary(),
            "dropped": dict(self.guard.dropped),
        }

    def _resolutions(self, dev: _Device) -> dict[str, dict[str, Any]]:
        """How fine each series is. Driver samples: their own period, read from their stamps.
        GPM: its window, never under the ~100 ms its counters move at. Rates: the gaps between
        value changes (an upper bound: a steady load changes nothing), never under 1/6 s."""
        gaps = sorted((b - a) / 1e3 for a, b in pairwise(dev.sample_stamps))
        period = gaps[len(gaps) // 2] if gaps else None
        out = {
            "samples": {
                "resolution_ms": period or SAMPLES_FLOOR_MS,
                "period_ms": period,
                "basis": f"driver sample period, median of {len(gaps)} gaps"
                if gaps
                else f"no driver samples; using the {SAMPLES_FLOOR_MS:.0f} ms floor",
            }
        }
        ms, basis = self.changes.resolution_ms(
            f"{dev.index}.rates", max(RATES_FLOOR_MS, self.interval_s * 1e3)
        )
        out["rates"] = {"resolution_ms": ms, "basis": basis}
        if dev.gpm:
            out["gpm"] = {
                "resolution_ms": self.gpm_interval_s * 1e3,
                "basis": "GPM window; its counters move about every 100 ms (measured on an H200)",
            }
        return out
