"""A stand-in for nvidia-ml-py's `pynvml` with no GPU behind it.

The development machine has no GPU, so the NVIDIA backend is tested against this:
the functions, constants, error type and return shapes the nvidia-ml-py documentation
and bindings give (ctypes structs become plain classes with the same field names):
- nvmlDeviceGetSamples(h, type, last_us) -> (value_type, [c_nvmlSample_t(timeStamp µs wall
  clock, sampleValue.uiVal)]), only samples newer than last_us; NVMLError NOT_FOUND when none
- nvmlDeviceGetUtilizationRates(h) -> .gpu, .memory (%)
- GPM: nvmlGpmQueryDeviceSupport(h).isSupportedDevice, nvmlGpmSampleAlloc/Get/Free,
  nvmlGpmMetricsGet(c_nvmlGpmMetricsGet_t) filling metrics[i].value and .nvmlReturn
- nvmlDeviceGetPowerUsage (mW), nvmlDeviceGetClockInfo (MHz), nvmlDeviceGetMemoryInfo
  (.total/.free/.used bytes), nvmlDeviceGetProcessUtilization(h, last_us) -> samples
  with pid, timeStamp, smUtil, memUtil, encUtil, decUtil.

The GPU it pretends to be is busy by `BUSY(t0_s, t1_s) -> %`, on the wall clock `NOW()`;
the driver keeps one utilization sample per SAMPLE_PERIOD_US. Tests replace these to
script an answer; the default (busy 0.5 s of every second) serves a whole `cputax run`
when this directory is on PYTHONPATH.
"""

import time

NVML_GPU_UTILIZATION_SAMPLES = 1
NVML_VALUE_TYPE_UNSIGNED_INT = 1
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_SUCCESS = 0
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_GPM_METRICS_GET_VERSION = 1
NVML_GPM_METRIC_GRAPHICS_UTIL = 1
NVML_GPM_METRIC_SM_UTIL = 2
NVML_GPM_METRIC_SM_OCCUPANCY = 3
NVML_GPM_METRIC_ANY_TENSOR_UTIL = 5
NVML_GPM_METRIC_DRAM_BW_UTIL = 10
_NAMES = {
    3: "Not Supported",
    6: "Not Found",
    9: "Driver Not Loaded",
    12: "NVML Shared Library Not Found",
}

SAMPLE_PERIOD_US = 100_000
DEVICES = [b"NVIDIA H200"]  # older nvidia-ml-py returns bytes, newer str: the backend takes both
GPM = True
INIT_ERROR = None  # an NVML error code nvmlInit raises (no driver)
UNSUPPORTED: set[str] = set()  # function names that raise NOT_SUPPORTED
PROCESSES = [4242]
calls: list[str] = []


def NOW() -> float:  # noqa: N802  (replaced by tests)
    return time.time()


def BUSY(t0: float, t1: float) -> float:  # noqa: N802
    """% of [t0, t1) the pretend GPU ran a kernel: the first half of every second."""
    total, t = 0.0, t0
    while t < t1:
        edge = min(t1, int(t) + (0.5 if t - int(t) < 0.5 else 1.0))
        if t - int(t) < 0.5:
            total += edge - t
        t = edge
    return 100.0 * total / (t1 - t0) if t1 > t0 else 0.0


class NVMLError(Exception):
    def __init__(self, value):
        super().__init__(value)
        self.value = value

    def __str__(self):
        return _NAMES.get(self.value, f"Unknown Error {self.value}")


def _check(name):
    calls.append(name)
    if name in UNSUPPORTED:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)


class c_nvmlValue_t:  # noqa: N801
    def __init__(self, ui):
        self.uiVal = ui


class c_nvmlSample_t:  # noqa: N801
    def __init__(self, ts, value):
        self.timeStamp = ts
        self.sampleValue = c_nvmlValue_t(value)


class c_nvmlUtilization_t:  # noqa: N801
    def __init__(self, gpu, memory):
        self.gpu, self.memory = gpu, memory


class c_nvmlMemory_t:  # noqa: N801
    def __init__(self, total, used):
        self.total, self.used, self.free = total, used, total - used


class c_nvmlProcessUtilizationSample_t:  # noqa: N801
    def __init__(self, pid, ts, sm, mem):
        self.pid, self.timeStamp, self.smUtil, self.memUtil, self.encUtil, self.decUtil = (
            pid,
            ts,
            sm,
            mem,
            0,
            0,
        )


class c_nvmlGpmSupport_t:  # noqa: N801
    def __init__(self, supported):
        self.version, self.isSupportedDevice = 1, supported


class c_nvmlGpmMetric_t:  # noqa: N801
    def __init__(self):
        self.metricId, self.nvmlReturn, self.value = 0, 0, 0.0


class c_nvmlGpmMetricsGet_t:  # noqa: N801
    def __init__(self):
        self.version = self.numMetrics = 0
        self.sample1 = self.sample2 = None
        self.metrics = [c_nvmlGpmMetric_t() for _ in range(98)]


class _GpmSample:
    def __init__(self):
        self.t = None


def nvmlInit():
    _check("nvmlInit")
    if INIT_ERROR is not None:
        raise NVMLError(INIT_ERROR)


def nvmlShutdown():
    _check("nvmlShutdown")


def nvmlSystemGetDriverVersion():
    return "580.159.04"


def nvmlDeviceGetCount():
    return len(DEVICES)


def nvmlDeviceGetHandleByIndex(i):
    return ("handle", i)


def nvmlDeviceGetName(h):
    return DEVICES[h[1]]


def nvmlDeviceGetUUID(h):
    return f"GPU-0000-{h[1]}"


def _utilization(now_s):
    return round(BUSY(now_s - 1.0 / 6, now_s))  # rates: a sliding 1/6 s average


def nvmlDeviceGetSamples(h, sampling_type, last_us):
    _check("nvmlDeviceGetSamples")
    now_us = int(NOW() * 1e6)
    newest = now_us - now_us % SAMPLE_PERIOD_US
    stamps = [newest - k * SAMPLE_PERIOD_US for k in range(100)][::-1]  # the driver keeps ~10 s
    samples = [
        c_nvmlSample_t(ts, round(BUSY((ts - SAMPLE_PERIOD_US) / 1e6, ts / 1e6)))
        for ts in stamps
        if ts > last_us
    ]
    if not samples:
        raise NVMLError(NVML_ERROR_NOT_FOUND)
    return NVML_VALUE_TYPE_UNSIGNED_INT, samples


def nvmlDeviceGetUtilizationRates(h):
    _check("nvmlDeviceGetUtilizationRates")
    return c_nvmlUtilization_t(_utilization(NOW()), 12)


def nvmlDeviceGetPowerUsage(h):
    _check("nvmlDeviceGetPowerUsage")
    return 350_000 if _utilization(NOW()) else 120_000


def nvmlDeviceGetClockInfo(h, clock):
    _check("nvmlDeviceGetClockInfo")
    return 1980 if clock == NVML_CLOCK_SM else 2619


def nvmlDeviceGetMemoryInfo(h):
    _check("nvmlDeviceGetMemoryInfo")
    return c_nvmlMemory_t(150_754_820_096, 80 * 2**30)


def nvmlDeviceGetProcessUtilization(h, last_us):
    _check("nvmlDeviceGetProcessUtilization")
    now_us = int(NOW() * 1e6)
    if now_us <= last_us or not PROCESSES:
        raise NVMLError(NVML_ERROR_NOT_FOUND)
    return [
        c_nvmlProcessUtilizationSample_t(pid, now_us, _utilization(NOW()), 5) for pid in PROCESSES
    ]


def nvmlGpmQueryDeviceSupport(h):
    _check("nvmlGpmQueryDeviceSupport")
    return c_nvmlGpmSupport_t(1 if GPM else 0)


def nvmlGpmSampleAlloc():
    return _GpmSample()


def nvmlGpmSampleFree(sample):
    calls.append("nvmlGpmSampleFree")


def nvmlGpmSampleGet(h, sample):
    _check("nvmlGpmSampleGet")
    sample.t = NOW()


def nvmlGpmMetricsGet(mg):
    _check("nvmlGpmMetricsGet")
    busy = BUSY(mg.sample1.t, mg.sample2.t)
    values = {
        NVML_GPM_METRIC_GRAPHICS_UTIL: busy,
        NVML_GPM_METRIC_SM_UTIL: 0.6 * busy,
        NVML_GPM_METRIC_SM_OCCUPANCY: 0.3 * busy,
        NVML_GPM_METRIC_ANY_TENSOR_UTIL: 0.5 * busy,
        NVML_GPM_METRIC_DRAM_BW_UTIL: 0.2 * busy,
    }
    for m in mg.metrics[: mg.numMetrics]:
        m.value, m.nvmlReturn = values.get(m.metricId, 0.0), NVML_SUCCESS
    return mg
