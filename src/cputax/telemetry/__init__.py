"""GPU (NVML, amdsmi) and host (psutil) telemetry behind one poller interface."""
