"""Telemetry backends.

There is no GPU on the development machine. The NVIDIA and AMD backends run against
tests/fakegpu/pynvml.py and amdsmi.py: stand-ins that answer with the functions, return
shapes and errors the nvidia-ml-py and amdsmi documentation give, loaded as plain module
objects (no real driver library is imported). Host telemetry is real: it watches real
processes on this machine.
"""

import importlib.util
import itertools
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import msgspec
import orjson
import pytest

from cputax.analysis.correlate import host_usage
from cputax.analysis.timeline import host_series, read_telemetry
from cputax.records import read_jsonl
from cputax.rundir import RunDir
from cputax.telemetry.amd import AmdPoller, import_amdsmi, value
from cputax.telemetry.base import ChangeTracker, TelemetryUnavailable, run_pollers
from cputax.telemetry.host import HostPoller
from cputax.telemetry.nvidia import NvidiaPoller, import_nvml
from cputax.telemetry.runner import TelemetryConfig, TelemetryMonitor, gpu_poller
from cputax.util import redact

FAKES = Path(__file__).parent / "fakegpu"


def polled(poller):
    """One poll's samples as telemetry.jsonl holds them (the typed samples, encoded)."""
    return [msgspec.to_builtins(s) for s in poller.poll()]


def fake(name):
    """A fresh copy of a stand-in module, so tests can script it independently."""
    spec = importlib.util.spec_from_file_location(f"fake_{name}", FAKES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ManualClock:
    def __init__(self, t):
        self.t = t

    def __call__(self):
        return self.t


# -- NVIDIA ------------------------------------------------------------------------


@pytest.fixture
def nvml():
    module = fake("pynvml")
    module.NOW = ManualClock(float(int(time.time())))  # on a whole second: busy for the next 0.5 s
    return module


def test_nvidia_open_describes_devices(nvml):
    poller = NvidiaPoller(nvml=nvml)
    info = poller.open()
    assert info["driver"] == "580.159.04"
    assert info["devices"] == [
        {"index": 0, "name": "NVIDIA H200", "uuid": "GPU-0000-0", "gpm": True}
    ]


def test_nvidia_driver_samples_on_the_monotonic_clock_only_once(nvml):
    poller = NvidiaPoller(interval_s=0.02, nvml=nvml)
    poller.open()
    first = [s for s in polled(poller) if s["kind"] == "util"]
    assert len(first) == 100  # the driver's whole buffer on the first read
    last_us = int(nvml.NOW() * 1e6)
    offset = time.time_ns() - time.monotonic_ns()
    assert abs(first[-1]["t_ns"] - (last_us * 1000 - offset)) < 5_000_000  # wall µs -> monotonic ns
    assert [s["gpu"] for s in first[-6:]] == [100, 0, 0, 0, 0, 0]  # busy, then the idle half second
    nvml.NOW.t += 0.35
    new = [s for s in polled(poller) if s["kind"] == "util"]
    assert [s["gpu"] for s in new] == [100, 100, 100]  # only the samples newer than the last seen
    assert all(b["t_ns"] - a["t_ns"] == 100_000_000 for a, b in zip(new, new[1:], strict=False))
    assert [s for s in polled(poller) if s["kind"] == "util"] == []  # NOT_FOUND: nothing new


def test_nvidia_rates_written_on_change(nvml):
    poller = NvidiaPoller(nvml=nvml)
    poller.open()
    kinds = [[s for s in polled(poller) if s["kind"] == "rates"] for _ in range(3)]
    assert [len(k) for k in kinds] == [1, 0, 0]  # unchanged: not written again within a second
    nvml.NOW.t += 0.3  # into the busy half: the 1/6 s average rises from 0 to 100
    (rates,) = [s for s in polled(poller) if s["kind"] == "rates"]
    assert rates["gpu"] == 100 and rates["mem"] == 12


def test_nvidia_gpm_windows_and_slow_metrics(nvml):
    poller = NvidiaPoller(interval_s=0.02, slow_interval_s=0.0, nvml=nvml)
    poller.open()  # the first GPM sample is taken here, at the whole second
    nvml.NOW.t += 0.5
    samples = polled(poller)
    (gpm,) = [s for s in samples if s["kind"] == "gpm"]
    assert gpm["gr_util"] == pytest.approx(100.0) and gpm["sm_util"] == pytest.approx(60.0)
    assert gpm["t0_ns"] < gpm["t_ns"]
    (power,) = [s for s in samples if s["kind"] == "power"]
    assert power == {
        **power,
        "power_w": 350.0,
        "sm_mhz": 1980,
        "mem_mhz": 2619,
        "mem_used_mb": 81920.0,
    }
    (proc,) = [s for s in samples if s["kind"] == "proc_util"]
    assert (proc["pid"], proc["sm"]) == (4242, 100)
    time.sleep(0.11)  # GPM is never windowed below 100 ms
    nvml.NOW.t += 0.5
    (gpm,) = [s for s in polled(poller) if s["kind"] == "gpm"]
    assert gpm["gr_util"] == pytest.approx(0.0)


def test_nvidia_unsupported_metric_is_dropped_once(nvml):
    nvml.UNSUPPORTED = {"nvmlDeviceGetPowerUsage"}
    poller = NvidiaPoller(slow_interval_s=0.0, nvml=nvml)
    poller.open()
    for _ in range(3):
        power = [s for s in polled(poller) if s["kind"] == "power"]
        assert "power_w" not in power[0] and power[0]["sm_mhz"] == 1980
    assert nvml.calls.count("nvmlDeviceGetPowerUsage") == 1
    assert "Not Supported" in poller.close()["dropped"]["power"]


def test_nvidia_resolution_is_measured_not_assumed(nvml):
    poller = NvidiaPoller(interval_s=0.02, nvml=nvml)
    poller.open()
    for _ in range(40):  # 4 s of driver samples, 100 ms apart
        nvml.NOW.t += 0.1
        polled(poller)
    info = poller.close()
    series = info["series"]["0"]
    assert (
        series["samples"]["period_ms"] == series["samples"]["resolution_ms"] == pytest.approx(100.0)
    )
    assert series["samples"]["basis"].startswith("driver sample period")
    assert series["gpm"]["resolution_ms"] >= 100.0
    # rates: the gaps between their value changes, but never finer than their 1/6 s window
    assert series["rates"]["resolution_ms"] == pytest.approx(167.0)
    assert info["changes"]["0.samples"]["changes"] >= 7
    assert 0 <= info["alignment_ms"] < 5
    assert "nvmlShutdown" in nvml.calls and "nvmlGpmSampleFree" in nvml.calls


def test_nvidia_missing_library_or_driver_is_one_line(nvml, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # as if nvidia-ml-py were not installed
    with pytest.raises(
        TelemetryUnavailable, match=r"nvidia-ml-py is not installed: pip install 'cputax\[nvidia\]'"
    ):
        import_nvml()
    poller, info, notes = gpu_poller("nvidia", TelemetryConfig())
    assert poller is None and info == {}
    (line,) = notes
    assert "\n" not in line and "cputax[nvidia]" in line
    nvml.INIT_ERROR = nvml.NVML_ERROR_LIBRARY_NOT_FOUND
    with pytest.raises(
        TelemetryUnavailable, match="NVML Shared Library Not Found.*install the NVIDIA driver"
    ):
        NvidiaPoller(nvml=nvml).open()


def test_auto_picks_the_backend_that_answers(nvml, monkeypatch):
    poller, info, notes = gpu_poller("auto", TelemetryConfig(), modules={"nvidia": nvml})
    assert poller.name == "nvidia" and notes == []
    monkeypatch.setitem(sys.modules, "pynvml", None)
    poller, _, notes = gpu_poller("auto", TelemetryConfig(), modules={"amd": fake("amdsmi")})
    assert poller.name == "amd" and notes == []
    monkeypatch.setitem(sys.modules, "amdsmi", None)
    poller, _, (line,) = gpu_poller("auto", TelemetryConfig())
    assert (
        poller is None and "nvidia-ml-py is not installed" in line and "amdsmi cannot load" in line
    )
    assert "cputax[nvidia]" in line and "cputax[amd]" in line
    assert gpu_poller("none", TelemetryConfig()) == (None, {}, [])


# -- AMD ---------------------------------------------------------------------------


def metrics(counter, gfx, umc, xcc):
    m = fake("amdsmi").METRICS
    return dict(
        m,
        accumulation_counter=counter,
        gfx_activity_acc=gfx,
        mem_activity_acc=umc,
        average_gfx_activity=40,
        xcp_stats=[dict(m["xcp_stats"][0], gfx_busy_acc=xcc)] + m["xcp_stats"][1:],
    )


def test_amd_interval_busy_from_accumulators():
    smi = fake("amdsmi")
    smi.SCRIPT = [
        metrics(1000, 0, 0, [0] * 8),
        metrics(1000, 0, 0, [0] * 8),  # the firmware has not refreshed: no interval yet
        metrics(1010, 5, 1, [10] * 4 + [0] * 4),
    ]
    poller = AmdPoller(slow_interval_s=1e9, amdsmi=smi)
    assert poller.open() == {"devices": [{"index": 0, "name": "AMD Instinct MI300X"}]}
    first = polled(poller)
    assert [s for s in first if s["kind"] == "activity"] == []
    assert [s for s in polled(poller) if s["kind"] == "activity"] == []
    (sample,) = [s for s in polled(poller) if s["kind"] == "activity"]
    assert sample["gfx"] == pytest.approx(50.0)  # 5 / 10 refreshes, x100 (RDC's formula)
    assert sample["umc"] == pytest.approx(10.0)
    assert sample["xcp_gfx"] == [
        pytest.approx(50.0)
    ]  # 4 of 8 XCCs fully busy; N/A partitions left out
    assert sample["avg_gfx"] == 40
    assert (
        sample["t0_ns"] == first[0]["t_ns"] < sample["t_ns"]
    )  # since the read that first saw counter 1000
    assert poller.close()["accumulator_scale"] == "fraction (x100)"


def test_amd_accumulators_that_count_percent_are_detected():
    smi = fake("amdsmi")
    smi.SCRIPT = [metrics(0, 0, 0, [0] * 8), metrics(10, 500, 100, [1000] * 8)]
    poller = AmdPoller(amdsmi=smi)
    poller.open()
    polled(poller)
    (sample,) = [s for s in polled(poller) if s["kind"] == "activity"]
    assert sample["gfx"] == pytest.approx(50.0) and sample["xcp_gfx"] == [pytest.approx(100.0)]
    assert poller.close()["accumulator_scale"] == "percent"


def test_amd_values_power_clocks_vram():
    assert value("N/A") is None and value(0xFFFF) is None and value(0xFFFFFFFFFFFFFFFF) is None
    assert value({"value": 152, "unit": "W"}) == 152 and value(0) == 0
    poller = AmdPoller(slow_interval_s=0.0, amdsmi=fake("amdsmi"))
    poller.open()
    (power,) = [s for s in polled(poller) if s["kind"] == "power"]
    assert power == {
        **power,
        "power_w": 152,
        "gfx_mhz": 132.0,
        "mem_mhz": 900,
        "vram_used_mb": 181200,
        "vram_total_mb": 196592,
    }


def test_amd_without_metrics_table_falls_back_to_activity():
    smi = fake("amdsmi")
    smi.UNSUPPORTED = {"amdsmi_get_gpu_metrics_info"}
    poller = AmdPoller(amdsmi=smi)
    poller.open()
    (sample,) = polled(poller)
    assert (sample["kind"], sample["gfx"], sample["umc"]) == ("activity_avg", 100, 25)
    assert "metrics.0" in poller.close()["dropped"]


def test_amd_resolution_measured_from_the_firmware_refresh():
    smi = fake("amdsmi")  # refreshes every 50 ms
    poller = AmdPoller(interval_s=0.01, amdsmi=smi)
    poller.open()
    end = time.monotonic() + 0.8
    busy = []
    stamps = []  # (before, after) each poll: on a loaded machine polls come late
    while time.monotonic() < end or len(busy) < 8:
        before = time.monotonic()
        busy += [s["gfx"] for s in polled(poller) if s["kind"] == "activity"]
        stamps.append((before, time.monotonic()))
        time.sleep(0.01)
    res = poller.close()["series"]["0"]["activity"]
    # A refresh is seen by the first poll after it, at most `late` later; so every gap
    # between seen changes is the refresh period give or take `late`, however loaded the
    # machine was. Unloaded, `late` is ~11 ms: 39-61 ms, where 10 ms (the poll) would fail.
    late = max(b[1] - a[0] for a, b in itertools.pairwise(stamps)) * 1e3 + 1
    refresh = smi.REFRESH_S * 1e3
    assert res["basis"].startswith("measured"), res
    assert max(10.0, refresh - late) <= res["resolution_ms"] <= refresh + late, (res, late)
    assert busy and all(0 <= b <= 100 for b in busy)


def test_amd_missing_library_is_one_line(monkeypatch, tmp_path, capsys):
    # what `import amdsmi` does without ROCm: print an OSError, then raise KeyError
    (tmp_path / "amdsmi.py").write_text(
        textwrap.dedent("""
        print("OSError: libamd_smi.so: cannot open shared object file")
        raise KeyError("libamd_smi.so")
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "amdsmi", raising=False)
    with pytest.raises(TelemetryUnavailable) as exc:
        import_amdsmi()
    line = str(exc.value)
    assert (
        "\n" not in line
        and "KeyError" in line
        and "cputax[amd]" in line
        and "libamd_smi.so" in line
    )
    assert capsys.readouterr().out == ""  # its print went to stderr: stdout carries JSONL
    smi = fake("amdsmi")
    smi.INIT_ERROR = True
    with pytest.raises(TelemetryUnavailable, match="amdsmi cannot start"):
        AmdPoller(amdsmi=smi).open()


# -- host (real processes) -----------------------------------------------------------

BUSY_CHILD = """
import subprocess, sys, threading, time
if sys.argv[1:] == ["child"]:
    threading.Thread(target=time.sleep, args=(30,), daemon=True, name="sleeper").start()
    end = time.monotonic() + float(30)
    while time.monotonic() < end:
        pass
else:
    subprocess.run([sys.executable, __file__, "child"])
"""


@pytest.fixture
def busy_family(tmp_path):
    """A parent that waits on a child burning one core in its main thread."""
    script = tmp_path / "busy.py"
    script.write_text(BUSY_CHILD)
    proc = subprocess.Popen([sys.executable, str(script)])
    parent = __import__("psutil").Process(proc.pid)
    deadline = time.monotonic() + 60  # two Pythons starting, however loaded the machine is
    while not parent.children() and time.monotonic() < deadline:
        time.sleep(0.05)
    yield proc
    for child in __import__("psutil").Process(proc.pid).children(recursive=True):
        child.kill()
    proc.kill()
    proc.wait()


def test_redact_hides_credentials():
    assert redact(
        ["vllm", "serve", "m", "--api-key", "sk-1", "--hf-token=abc", "--port", "8000"]
    ) == ["vllm", "serve", "m", "--api-key", "***", "--hf-token=***", "--port", "8000"]
    assert redact(["python", "-m", "cputax.targets.stub", '{"api_key": "sk-2"}']) == [
        "python",
        "-m",
        "cputax.targets.stub",
        "***",
    ]


def test_host_poller_sees_child_processes_and_threads(busy_family):
    poller = HostPoller(interval_s=0.1, pids={busy_family.pid: "server"})
    assert poller.open()["roots"] == {str(busy_family.pid): "server"}
    (busy,) = __import__("psutil").Process(busy_family.pid).children()
    rows = []
    # The child's own CPU seconds, read directly around the same polls: what the
    # poller's figure must match however much CPU the loaded machine left the child.
    # Polled until the child has had 0.5 s of CPU (a second, unloaded), so that the 10 ms
    # ticks of cpu_times are a small part of what is compared, however loaded the machine.
    cpu0, t0 = sum(busy.cpu_times()[:2]), time.monotonic_ns()
    deadline = time.monotonic() + 60
    polls = 0
    while polls < 11 or (sum(busy.cpu_times()[:2]) - cpu0 < 0.5 and time.monotonic() < deadline):
        if polls:
            time.sleep(0.1)
        rows += polled(poller)
        polls += 1
    t1, cpu1 = time.monotonic_ns(), sum(busy.cpu_times()[:2])
    direct_pct = 100.0 * (cpu1 - cpu0) / ((t1 - t0) / 1e9)
    info = poller.close()
    assert info["processes"] == 2 and info["thread_cpu"] == "schedstat ns"
    host = host_series(read_telemetry(rows))
    usage = host_usage(host, (t0, t1))
    child = next(p for p in usage.processes if p.pid != busy_family.pid)
    parent = next(p for p in usage.processes if p.pid == busy_family.pid)
    assert child.pid == busy.pid
    assert child.role == "server" and child.name.startswith("python")
    assert cpu1 - cpu0 >= 0.5, "the machine left the busy child no CPU in a minute"
    # 10 points: the 10 ms ticks of cpu_times, twice over 0.5 s of the child's CPU or more
    assert child.cpu_pct == pytest.approx(direct_pct, abs=10)
    assert parent.cpu_pct < min(10, direct_pct / 2)  # it only waits on the child
    main = child.threads[0]  # from schedstat, not cpu_times: it agrees with the process
    assert main.tid == child.pid
    assert main.cpu_pct == pytest.approx(child.cpu_pct, abs=10)
    cores_busy = usage.system_busy_pct * usage.cpus  # the child is part of the machine
    assert usage.cpus >= 1 and cores_busy >= child.cpu_pct - 10
    # both threads named once (the OS name: Python before 3.14 leaves it the process name)
    names = [r["names"] for r in rows if r["kind"] == "thread_names" and r["pid"] == child.pid]
    assert sum(map(len, names)) == 2
    assert any(r["kind"] == "proc_info" and r["cmdline"][-1] == "child" for r in rows)


def _wait_for(path: Path, done, timeout_s: float = 60.0) -> None:
    """Until the telemetry file (flushed per row) satisfies `done`: as long as a loaded
    machine needs, rather than a fixed sleep; the test's own asserts then say what is wrong."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and done(list(read_jsonl(path))):
            return
        time.sleep(0.05)


def test_telemetry_monitor_runs_beside_the_run(busy_family, tmp_path):
    monitor = TelemetryMonitor(TelemetryConfig(gpu="none", host_interval_ms=50))
    monitor.start(RunDir(tmp_path), {"kind": "embedded", "pid": busy_family.pid})
    # until the server's process has been polled 5 times (0.25 s, unloaded), not a fixed time
    _wait_for(
        tmp_path / "telemetry.jsonl",
        lambda rows: sum(r["kind"] == "proc" and r["pid"] == busy_family.pid for r in rows) >= 5,
    )
    meta = monitor.stop()
    assert meta["host"]["roots"][str(busy_family.pid)] == "server" and meta["notes"] == []
    assert meta["host"]["cost"]["polls"] >= 5
    rows = list(read_jsonl(tmp_path / "telemetry.jsonl"))
    assert rows[0]["kind"] == "clock"
    assert {r["pid"] for r in rows if r["kind"] == "proc" and r["role"] == "server"} >= {
        busy_family.pid
    }


def test_telemetry_monitor_with_a_gpu_backend(tmp_path, monkeypatch):
    """The child process imports `pynvml`: the stand-in, through PYTHONPATH."""
    monkeypatch.setenv("PYTHONPATH", str(FAKES))
    monitor = TelemetryMonitor(
        TelemetryConfig(gpu="nvidia", gpu_interval_ms=20, slow_interval_ms=100)
    )
    monitor.start(RunDir(tmp_path), {"kind": "external", "endpoint": "http://10.255.255.1:8000"})
    wanted = {"clock", "util", "rates", "gpm", "power", "system"}
    _wait_for(tmp_path / "telemetry.jsonl", lambda rows: wanted <= {r["kind"] for r in rows})
    meta = monitor.stop()
    assert meta["nvidia"]["devices"][0]["name"] == "NVIDIA H200"
    assert meta["nvidia"]["series"]["0"]["samples"]["period_ms"] == pytest.approx(100.0)
    kinds = {r["kind"] for r in read_jsonl(tmp_path / "telemetry.jsonl")}
    assert wanted <= kinds


def test_change_tracker_floor():
    tracker = ChangeTracker()
    for i in range(20):
        tracker.observe("x", i * 10_000_000, i // 3)  # changes every 30 ms
    assert tracker.resolution_ms("x", 20.0)[0] == pytest.approx(30.0)
    assert tracker.resolution_ms("x", 50.0)[0] == 50.0  # never finer than the floor
    ms, basis = tracker.resolution_ms("y", 100.0)
    assert ms == 100.0 and basis.startswith("not measured")
    assert orjson.dumps(tracker.summary())


def test_a_failing_poller_is_stopped_and_the_others_go_on():
    stop = threading.Event()

    class Broken:
        name, interval_s = "broken", 0.01

        def poll(self):
            raise AttributeError("module 'pynvml' has no attribute 'nvmlDeviceGetSamples'")

    class Counting:
        name, interval_s, polls = "counting", 0.01, 0

        def poll(self):
            self.polls += 1
            if self.polls == 5:  # enough to show it went on; a stopped runner never gets here
                stop.set()
            return [{"t_ns": time.monotonic_ns(), "src": "t", "kind": "x"}]

    ok, out = Counting(), []
    guard = threading.Timer(60, stop.set)  # ends the test only if the runner stopped polling it
    guard.daemon = True
    guard.start()
    stats = run_pollers([Broken(), ok], out.append, stop)
    guard.cancel()
    assert (
        "AttributeError" in stats["broken"].summary()["error"]
        and stats["broken"].summary()["polls"] == 0
    )
    assert ok.polls >= 5 and len(out) == ok.polls and stats["counting"].summary()["error"] is None
