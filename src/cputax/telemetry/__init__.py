"""Host (psutil, /proc) and GPU (NVML, amdsmi) telemetry behind one poller interface.

base     the Poller interface and the loop that runs pollers on one clock
host     per process and thread CPU, run-queue wait, system CPU
nvidia   NVML utilization samples, GPM, power, clocks, memory
amd      amdsmi activity accumulators, per-XCP busy, power, clocks
runner   the pollers in a child process beside a run (TelemetryMonitor)
"""

from cputax.telemetry.base import Poller, Sample, TelemetryUnavailable, run_pollers
from cputax.telemetry.host import HostPoller
from cputax.telemetry.runner import TelemetryConfig, TelemetryMonitor, clock_sample, gpu_poller

__all__ = [
    "HostPoller",
    "Poller",
    "Sample",
    "TelemetryConfig",
    "TelemetryMonitor",
    "TelemetryUnavailable",
    "clock_sample",
    "gpu_poller",
    "run_pollers",
]
