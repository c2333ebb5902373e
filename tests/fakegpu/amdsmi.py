"""A stand-in for the `amdsmi` Python package with no GPU (and no ROCm) behind it.

The development machine has no AMD GPU, so the AMD backend is tested against the return
shapes the amdsmi Python API documents: dicts with "N/A" for unsupported fields, lists
for per-instance arrays, and on MI300X `xcp_stats` (one dict per partition, lists per
XCC) and the activity accumulators of gpu_metrics 1.6. METRICS below is one MI300X answer
of amdsmi_get_gpu_metrics_info, abridged; the counters move with the pretend load.

The pretend GPU is busy the first half of every second (BUSY_TIME is the cumulative busy
seconds); the firmware refreshes its table every REFRESH_S, and the accumulators count
busy as a fraction of each refresh times ACC_SCALE (1 as RDC's formula assumes, 100 if
they count percent). Tests replace these, or script exact answers in SCRIPT.
"""

import time

REFRESH_S = 0.05
ACC_SCALE = 1
XCC = 8
SCRIPT: list[dict] = []  # exact answers of amdsmi_get_gpu_metrics_info, used first
UNSUPPORTED: set[str] = set()
INIT_ERROR = False
calls: list[str] = []


class AmdSmiException(Exception):
    pass


class AmdSmiLibraryException(AmdSmiException):
    def __init__(self, err_code):
        super().__init__(err_code)
        self.err_code = err_code
        self.err_info = (
            "AMDSMI_STATUS_NOT_SUPPORTED" if err_code == 2 else "AMDSMI_STATUS_INIT_ERROR"
        )

    def __str__(self):
        return f"An error occurred with code: {self.err_code}({self.err_info})"


class AmdSmiInitFlags:
    INIT_AMD_GPUS = 2


def NOW() -> float:  # noqa: N802
    return time.monotonic()


def BUSY_TIME(t: float) -> float:  # noqa: N802
    """Busy seconds up to t: the first half of every second."""
    return int(t) * 0.5 + min(t - int(t), 0.5)


METRICS = {
    "temperature_edge": "N/A",
    "temperature_hotspot": 44,
    "temperature_mem": 37,
    "average_gfx_activity": 0,
    "average_umc_activity": 0,
    "average_mm_activity": "N/A",
    "average_socket_power": "N/A",
    "current_socket_power": 152,
    "energy_accumulator": 1_398_265_128_472,
    "system_clock_counter": 0,
    "firmware_timestamp": 0,
    "current_gfxclk": "N/A",
    "current_gfxclks": [132] * XCC,
    "current_uclk": 900,
    "throttle_status": "N/A",
    "gfx_activity_acc": 0,
    "mem_activity_acc": 0,
    "accumulation_counter": 0,
    "num_partition": 1,
    "xcp_stats": [
        {
            "gfx_busy_inst": [0] * XCC,
            "jpeg_busy": [0] * 32,
            "vcn_busy": [0] * 4,
            "gfx_busy_acc": [0] * XCC,
        }
    ]
    + [
        {
            "gfx_busy_inst": ["N/A"] * XCC,
            "jpeg_busy": ["N/A"] * 32,
            "vcn_busy": ["N/A"] * 4,
            "gfx_busy_acc": ["N/A"] * XCC,
        }
        for _ in range(7)
    ],
}


def _check(name):
    calls.append(name)
    if name in UNSUPPORTED:
        raise AmdSmiLibraryException(2)


def amdsmi_init(flags=AmdSmiInitFlags.INIT_AMD_GPUS):
    _check("amdsmi_init")
    if INIT_ERROR:
        raise AmdSmiLibraryException(34)


def amdsmi_shut_down():
    _check("amdsmi_shut_down")


def amdsmi_get_processor_handles():
    return ["gpu0"]


def amdsmi_get_gpu_asic_info(h):
    return {
        "market_name": "AMD Instinct MI300X",
        "vendor_id": "0x1002",
        "device_id": "0x74a1",
        "rev_id": "0x00",
        "asic_serial": "0x1234",
        "oam_id": 0,
    }


def amdsmi_get_gpu_metrics_info(h):
    _check("amdsmi_get_gpu_metrics_info")
    if SCRIPT:
        return SCRIPT.pop(0)
    now = NOW()
    k = int(now / REFRESH_S)  # refreshes so far: the table changes only then
    t = k * REFRESH_S
    acc = round(ACC_SCALE * BUSY_TIME(t) / REFRESH_S)
    inst = 100 if t - int(t) < 0.5 else 0
    m = dict(
        METRICS,
        accumulation_counter=k,
        gfx_activity_acc=acc,
        mem_activity_acc=acc // 4,
        average_gfx_activity=inst,
        average_umc_activity=inst // 4,
        system_clock_counter=int(t * 1e9),
        firmware_timestamp=int(t * 1e8),
    )
    m["xcp_stats"] = [
        dict(METRICS["xcp_stats"][0], gfx_busy_inst=[inst] * XCC, gfx_busy_acc=[acc] * XCC)
    ]
    m["xcp_stats"] += METRICS["xcp_stats"][1:]
    return m


def amdsmi_get_gpu_activity(h):
    _check("amdsmi_get_gpu_activity")
    return {"gfx_activity": 100, "umc_activity": 25, "mm_activity": "N/A"}


def amdsmi_get_gpu_vram_usage(h):
    _check("amdsmi_get_gpu_vram_usage")
    return {"vram_total": 196592, "vram_used": 181200}
