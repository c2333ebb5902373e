"""cputax on Ray (the [ray] extra), in a local cluster on this machine: load shards as actors,
node agents on simulated server nodes (extra raylets with the cputax-server resource), the
clock estimate, and a shard that dies. Skipped without Ray."""

from __future__ import annotations

import asyncio
import os
import signal

os.environ.setdefault(
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"
)  # before Ray is imported: loopback only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import orjson  # noqa: E402
import pytest  # noqa: E402

ray = pytest.importorskip("ray")

from conftest import needs_pyspy  # noqa: E402

from cputax.client.loadgen import run_scenario  # noqa: E402
from cputax.cluster.clock import NodeClock, Offset, measure  # noqa: E402
from cputax.cluster.load import ClientSpec, run_ray_shards  # noqa: E402
from cputax.cluster.ray_env import Cluster, RayOptions  # noqa: E402
from cputax.commands.run import run  # noqa: E402
from cputax.records import RequestRecord, read_requests  # noqa: E402
from cputax.sampling.pyspy import SamplerConfig  # noqa: E402
from cputax.sampling.pyspy_monitor import PyspyOptions  # noqa: E402
from cputax.session import RunOptions  # noqa: E402
from cputax.targets.stub import StubConfig, StubServer  # noqa: E402
from cputax.text.tokenizer import load_tokenizer  # noqa: E402
from cputax.workload.profiles import Scenario  # noqa: E402
from cputax.workload.prompts import ScenarioPrompts, local_counter  # noqa: E402

pytestmark = pytest.mark.slow
MS = 1_000_000
FIRST_MS = 40.0
STUB = StubConfig(first_token_delay_ms=FIRST_MS, inter_token_delay_ms=2.0, output_tokens=8)
PROFILE = """
[defaults]
max_tokens = 8
warmup = 1
[[scenario]]
name = "conc4"
concurrency = 4
context_tokens = 400
batches = 3
"""


@pytest.fixture(scope="module")
def stub():
    with StubServer(STUB, process=True) as server:
        yield server


def test_node_clock_conversion_follows_offset_and_drift():
    # a node 5 s ahead at driver time 0, 5 s + 100 us at driver time 10 s: 10 ppm of drift
    clock = NodeClock(
        "n", Offset(5_000_000_000, 20_000, 40_000, 0), Offset(5_000_100_000, 30_000, 60_000, 10**10)
    )
    assert clock.drift_ppm == pytest.approx(10.0) and clock.error_ns == 30_000
    assert clock.to_driver(5_000_050_000 + 5 * 10**9) == pytest.approx(5 * 10**9, abs=2)
    assert clock.to_node(clock.to_driver(123_456_789_000)) == pytest.approx(123_456_789_000, abs=2)
    assert NodeClock.of_driver("me", 7).to_driver(42) == 42


def test_a_run_on_a_local_cluster_with_two_load_shards(stub, tmp_path):
    profile = tmp_path / "p.toml"
    profile.write_text(PROFILE)
    out = tmp_path / "out"
    assert (
        run(
            RunOptions(
                endpoint=stub.url,
                profile=profile,
                out=out,
                client_procs=2,
                ray=RayOptions(num_cpus=2),
            )
        )
        == 0
    )
    records = read_requests(out / "requests.jsonl")
    assert sorted(r.index for r in records) == list(range(12)) and all(r.ok for r in records)
    window = orjson.loads((out / "windows.jsonl").read_bytes().splitlines()[0])
    assert (
        window["client_procs"] == 2
        and window["shard_records"] == [6, 6]
        and window["shard_failures"] == []
    )
    # the driver's own machine: one clock, nothing estimated
    assert all(c["error_ns"] == 0 for c in window["shard_clocks"])
    summary = orjson.loads((out / "summary.json").read_bytes())["scenarios"][0]
    assert summary["clock"] == "kernel" and summary["mean_ms"]["prefill"] == pytest.approx(
        FIRST_MS, abs=15
    )
    info = orjson.loads((out / "run.json").read_bytes())
    assert info["ray"]["address"] == "a local cluster on loopback"
    assert all(n["ip"] == "127.0.0.1" for n in info["ray"]["nodes"])  # nothing beyond loopback


def _prompts(concurrency: int, batches: int) -> ScenarioPrompts:
    tok = load_tokenizer()
    prompts = ScenarioPrompts(
        Scenario(
            name="s", context_tokens=300, max_tokens=8, concurrency=concurrency, batches=batches
        ),
        tok,
        model=STUB.model,
    )
    asyncio.run(prompts.prepare(local_counter(tok)))
    return prompts


def test_timing_against_the_stubs_truth_and_a_shard_killed_mid_run(stub):
    prompts = _prompts(concurrency=4, batches=3)

    async def work(client, share, start_ns, on_record, barrier):
        if share.k == 1:  # one request, then its process dies
            on_record(
                await client.send(
                    prompts.record(1, 0), lambda: prompts.payload(prompts.messages(1))
                )
            )
            await asyncio.sleep(0.2)
            os.kill(os.getpid(), signal.SIGKILL)
        return await run_scenario(
            client, prompts, on_record, share=share, start_ns=start_ns, barrier=barrier
        )

    lines: list[bytes] = []
    with Cluster(RayOptions(num_cpus=2)) as cluster:
        spec = ClientSpec(stub.url, "chat", 60.0, 16, None)
        window = asyncio.run(
            run_ray_shards(cluster, 2, spec, work, lambda line, ok: lines.append(line))
        )

        async def truth():
            from cputax.client.stream import StreamingClient

            async with StreamingClient(stub.url) as client:
                return await client.get_json("/stub/truth")

        sent = asyncio.run(truth())
    records = [RequestRecord.from_dict(orjson.loads(line)) for line in lines]
    assert window.records == [6, 1] and len(records) == 7
    assert len(window.failures) == 1 and window.failures[0].startswith(
        "load shard 1 of 2 on node 127.0.0.1 stopped"
    )
    assert window.failures[0].endswith("after 1 finished requests; those are kept")
    for r in records:  # the kernel's stamps against the stub's send times, as in one process
        stub_first = sent[r.extra["response_id"]]["first_token_ns"]
        assert 0 <= r.t_first_token_kernel - stub_first < 5 * MS


def test_the_clock_estimate_recovers_an_injected_offset():
    from cputax.cluster.agents import NodeAgent
    from cputax.telemetry.runner import TelemetryConfig

    skew = 3_217_000_000  # this "node" reads 3.217 s ahead
    with Cluster(RayOptions(num_cpus=2)) as cluster:
        agent = ray.remote(num_cpus=0)(NodeAgent).remote(
            TelemetryConfig(gpu="none"), None, {}, skew
        )
        ray.get(agent.now.remote())  # started
        import time

        offset = measure(lambda: ray.get(agent.now.remote()), time.monotonic_ns)
        del cluster
    assert offset.error_ns > 0 and abs(offset.offset_ns - skew) <= offset.error_ns


@needs_pyspy
def test_two_server_nodes_each_profiled_by_its_agent(stub, tmp_path):
    from ray.cluster_utils import Cluster as LocalNodes

    profile = tmp_path / "p.toml"
    profile.write_text(PROFILE.replace("batches = 3", "batches = 2"))
    nodes = LocalNodes(
        initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 80 * 2**20}
    )
    try:
        for _ in range(2):
            nodes.add_node(
                num_cpus=1, resources={"cputax-server": 1}, object_store_memory=80 * 2**20
            )
        nodes.wait_for_nodes()
        with StubServer(STUB, process=True) as second:
            ids = [
                n["NodeID"] for n in ray_nodes(nodes.address) if n["Resources"].get("cputax-server")
            ]
            ports = [int(stub.url.rsplit(":", 1)[1]), int(second.url.rsplit(":", 1)[1])]
            out = tmp_path / "out"
            opts = RunOptions(
                endpoint=stub.url,
                profile=profile,
                out=out,
                ray=RayOptions(
                    address=nodes.address,
                    server_nodes=[f"{i}:{p}" for i, p in zip(ids, ports, strict=True)],
                ),
                pyspy=PyspyOptions(SamplerConfig(rate=50)),
            )
            assert run(opts) == 0
    finally:
        nodes.shutdown()
    folders = sorted((out / "nodes").iterdir())
    assert len(folders) == 2
    for folder in folders:
        manifest = [
            orjson.loads(line)
            for line in (folder / "pyspy" / "manifest.jsonl").read_bytes().splitlines()
        ]
        assert {m["window"] for m in manifest} == {"conc4"} and all(
            m["status"] == "ok" for m in manifest
        )
        assert (folder / "telemetry.jsonl").exists() and orjson.loads(
            (folder / "clock.json").read_bytes()
        )["converted"]
    report = (out / "report.md").read_text()
    assert report.count("### Node ") == 2 and "## Server nodes (Ray)" in report


def ray_nodes(address: str) -> list[dict]:
    """The cluster's nodes, seen from a short-lived driver."""
    ray.init(address=address, namespace="cputax-test", log_to_driver=False)
    try:
        return [n for n in ray.nodes() if n["Alive"]]
    finally:
        ray.shutdown()


def test_profile_on_ray_refuses_a_local_pid_in_one_line(tmp_path):
    from cputax.commands.profile import profile
    from cputax.errors import CputaxError
    from cputax.sampling.pyspy_monitor import Discovery

    with pytest.raises(CputaxError, match="--pid names a process on this host"):
        profile(Discovery(pid=os.getpid()), 1.0, tmp_path / "p", SamplerConfig(), RayOptions())
    assert not (tmp_path / "p").exists()  # refused before anything was made


def test_an_interrupted_ray_run_keeps_its_requests_in_flight():
    """The run's task cancelled (Ctrl-C, SIGTERM) while every shard has requests in flight:
    each shard's load is cancelled and its `cancelled` records reach the driver."""
    from cputax.client.stream import StreamingClient

    slow = StubConfig(inter_token_delay_ms=50.0, output_tokens=300)  # 15 s a request
    tok = load_tokenizer()
    prompts = ScenarioPrompts(
        Scenario(name="s", context_tokens=300, max_tokens=300, concurrency=4, batches=2),
        tok,
        model=STUB.model,
    )
    asyncio.run(prompts.prepare(local_counter(tok)))

    async def work(client, share, start_ns, on_record, barrier):
        return await run_scenario(
            client, prompts, on_record, share=share, start_ns=start_ns, barrier=barrier
        )

    lines: list[bytes] = []
    with StubServer(slow, process=True) as server, Cluster(RayOptions(num_cpus=2)) as cluster:
        spec = ClientSpec(server.url, "chat", 60.0, 16, None)

        async def go():
            task = asyncio.create_task(
                run_ray_shards(cluster, 2, spec, work, lambda line, ok: lines.append(line))
            )
            async with StreamingClient(server.url) as client:
                for _ in range(600):  # until all four are streaming (the stub's own gauge)
                    _, text = await client.get_text("/metrics")
                    if 'vllm:num_requests_running{engine="0",model_name="cputax-stub"} 4.0' in text:
                        break
                    await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(go())
    records = [RequestRecord.from_dict(orjson.loads(line)) for line in lines]
    assert sorted(r.index for r in records) == [0, 1, 2, 3]
    assert all(r.error == "cancelled" and r.chunks > 0 and r.t_first_token for r in records)


def test_ctrl_c_on_cputax_run_with_ray_keeps_every_request_and_says_so(tmp_path):
    """`cputax run --ray` as a user runs it, and Ctrl-C from the terminal (SIGINT to the
    whole process group: cputax, the local Ray cluster it started, the shards) while the
    second batch streams: exit 128 + SIGINT, no traceback, every request a record (the
    second batch's `cancelled`), the run and its report say so, and the cluster is gone."""
    import time

    import psutil
    from helpers import start_run

    slow = StubConfig(inter_token_delay_ms=50.0, output_tokens=100)  # 5 s a request
    profile = tmp_path / "p.toml"
    profile.write_text(PROFILE.replace("max_tokens = 8", "max_tokens = 100"))
    out = tmp_path / "out"
    with StubServer(slow, process=True) as server:
        proc = start_run(server.url, profile, out, "--client-procs", "2", "--ray")
        deadline = time.monotonic() + 300
        done = out / "requests.jsonl"
        while time.monotonic() < deadline and proc.poll() is None:  # the first batch is in
            if done.exists() and len(done.read_bytes().splitlines()) >= 4:
                break
            time.sleep(0.1)
        time.sleep(1.5)  # the second batch is streaming
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "interrupted by SIGINT" in err
    records = read_requests(out / "requests.jsonl")
    assert sorted(r.index for r in records) == list(range(8)), [r.index for r in records]
    assert all(r.ok for r in records if r.batch == 0)
    cancelled = [r for r in records if r.batch == 1]
    assert all(r.error == "cancelled" for r in cancelled)
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["interrupted"]["signal"] == "SIGINT"
    assert "**Interrupted**" in (out / "report.md").read_text()
    time.sleep(2)
    alive = [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert not alive, [psutil.Process(p).cmdline()[:3] for p in alive]
