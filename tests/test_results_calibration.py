"""`cputax calibrate`'s results as typed files: the calibration, the peers comparison and the
machine's ceiling round-trip; a ceiling file written before versions still reads, one of an
unknown version is ignored with a line (a run never fails for it); the command renders the
fields and its JSON keeps the shape the dicts had."""

from __future__ import annotations

import os

import msgspec
import orjson
import pytest

from cputax.commands import calibrate as command
from cputax.errors import CputaxError
from cputax.peers.calibrate import (
    CEILING_SHARE,
    KEYS,
    ceiling_line,
    failed,
    load_ceiling,
    save_ceiling,
)
from cputax.results import format as result_format
from cputax.results.calibration import (
    FORMAT_VERSION,
    Calibration,
    Ceiling,
    Level,
    PairedRatios,
    PeerRow,
    PeersResult,
    PeerStub,
    Skipped,
    StubTimings,
)
from cputax.util import cpu_model


def _level(
    concurrency: int, offered: int, ceiling: int, errors: int = 0, first_error: str | None = None
) -> Level:
    return Level(
        concurrency=concurrency,
        requests=8,
        errors=errors,
        client_cpu_us_per_chunk=12.5,
        parse_cpu_us_per_chunk=3.25,
        client_build_cpu_us=40.0,
        offered_chunks_per_s=offered,
        max_chunks_per_s=ceiling,
        past_ceiling=offered > CEILING_SHARE * ceiling,
        ttft_error_ms_p50=0.1,
        ttft_error_ms_p99=0.4,
        ttft_error_kernel_ms_p50=0.05,
        ttft_error_kernel_ms_p99=0.2,
        itl_error_ms_p99=0.3,
        itl_error_kernel_ms_p99=None,
        headers_error_ms_p50=0.1,
        headers_error_ms_p99=0.3,
        client_lag_ms_p50=0.02,
        client_lag_ms_p99=0.07,
        shared_stamps_pct=0.0,
        first_error=first_error,
    )


def _calibration(*levels: Level) -> Calibration:
    return Calibration(
        timed_stub=StubTimings(
            headers_delay_ms=5.0,
            first_token_delay_ms=20.0,
            inter_token_delay_ms=5.0,
            output_tokens=64,
        ),
        cpus=os.cpu_count() or 1,
        kernel_stamps=True,
        clock_conversion_error_us=1.5,
        clock_steps=0,
        note="a note",
        levels=list(levels),
    )


def _row(client: str, cpu: float, vs: PairedRatios | None = None) -> PeerRow:
    return PeerRow(
        client=client,
        streams=4,
        requests=8,
        stamps="kernel",
        errors=0,
        cpu_us_per_chunk=cpu,
        ttft_error_ms_p50=0.1,
        ttft_error_ms_p99=0.5,
        itl_error_ms_p99=0.2,
        ttft_error_loop_ms_p99=0.9,
        itl_error_loop_ms_p99=0.4,
        max_chunks_per_s=20000.0,
        runs=2,
        cpu_us_per_chunk_range=[cpu - 1, cpu + 1],
        vs_cputax=vs,
    )


def _peers() -> PeersResult:
    vs = PairedRatios(
        cpu_us_per_chunk=1.5,
        cpu_us_per_chunk_range=[1.25, 1.75],
        ttft_error_ms_p99=2.0,
        itl_error_ms_p99=None,
        max_chunks_per_s=0.5,
    )
    stub = PeerStub(
        headers_delay_ms=5.0,
        first_token_delay_ms=20.0,
        inter_token_delay_ms=5.0,
        output_tokens=64,
        model="cputax-stub",
        max_model_len=131072,
        api_key=None,
        fault=None,
        auto_tool_choice=False,
        token_truth=True,
    )
    return PeersResult(
        peers=[_row("cputax", 10.0), _row("vllm-bench", 15.0, vs)],
        skipped=[Skipped(client="aiperf", why="not installed")],
        cpus=2,
        cpu_model="x",
        repeat=2,
        timed_stub=stub,
        note="a note",
    )


def test_the_calibration_round_trips_and_keeps_its_json_shape():
    result = _calibration(
        _level(1, 200, 30000), _level(4, 800, 900, errors=1, first_error="HTTP 500: boom")
    )
    raw = orjson.loads(result_format.encode(result))
    assert raw["format_version"] == FORMAT_VERSION
    assert raw["timed_stub"] == {
        "headers_delay_ms": 5.0,
        "first_token_delay_ms": 20.0,
        "inter_token_delay_ms": 5.0,
        "output_tokens": 64,
    }
    # every level has the documented keys; only a failed one has `first_error`
    assert all(set(KEYS) <= set(level) for level in raw["levels"])
    assert "first_error" not in raw["levels"][0]
    assert raw["levels"][1]["first_error"] == "HTTP 500: boom"
    assert msgspec.json.decode(result_format.encode(result), type=Calibration) == result


def test_the_peers_comparison_round_trips_and_cputax_has_no_ratio_to_itself():
    result = _peers()
    raw = orjson.loads(result_format.encode(result))
    assert raw["format_version"] == FORMAT_VERSION
    assert "vs_cputax" not in raw["peers"][0]
    assert raw["peers"][1]["vs_cputax"]["cpu_us_per_chunk_range"] == [1.25, 1.75]
    assert raw["peers"][0]["cpu_us_per_chunk_range"] == [9.0, 11.0]
    assert raw["skipped"] == [{"client": "aiperf", "why": "not installed"}]
    assert msgspec.json.decode(result_format.encode(result), type=PeersResult) == result


def test_the_ceiling_round_trips_through_its_file_and_run_json(tmp_path):
    result = _calibration(_level(1, 200, 30000), _level(4, 800, 41000))
    path = save_ceiling(result, tmp_path / "calibration.json")
    kept = load_ceiling(path)
    assert kept is not None and kept.max_chunks_per_s == 41000 and kept.share == CEILING_SHARE
    assert orjson.loads(path.read_bytes())["format_version"] == FORMAT_VERSION
    assert Ceiling.load(path) == kept
    # `cputax run` copies it into run.json as builtins; analysis reads that copy back
    info = orjson.loads(orjson.dumps({"client_ceiling": result_format.to_builtins(kept)}))
    assert Ceiling.of_run(info) == kept


def test_run_json_without_a_fitting_ceiling_has_none():
    assert Ceiling.of_run({}) is None
    assert Ceiling.of_run({"client_ceiling": None}) is None
    assert Ceiling.of_run({"client_ceiling": {"share": 0.8}}) is None  # no max_chunks_per_s


def test_a_ceiling_file_written_before_versions_still_reads(tmp_path):
    path = tmp_path / "calibration.json"
    old = {
        "max_chunks_per_s": 41000,
        "share": 0.8,
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "measured_at": "2026-01-01T00:00:00Z",
    }
    path.write_bytes(orjson.dumps(old))
    kept = load_ceiling(path)
    assert kept is not None
    assert (kept.max_chunks_per_s, kept.share, kept.measured_at) == (41000, 0.8, old["measured_at"])
    path.write_bytes(orjson.dumps({**old, "cpu_model": cpu_model() + " (another)"}))
    assert load_ceiling(path) is None  # another CPU's ceiling says nothing of this one


def test_a_ceiling_file_of_an_unknown_version_is_ignored_in_one_line(tmp_path, capsys):
    path = tmp_path / "calibration.json"
    path.write_bytes(
        orjson.dumps(
            {
                "format_version": 99,
                "max_chunks_per_s": 41000,
                "share": 0.8,
                "cpus": os.cpu_count(),
                "cpu_model": cpu_model(),
            }
        )
    )
    with pytest.raises(CputaxError, match="format version 99"):
        Ceiling.load(path)
    assert load_ceiling(path) is None
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "format version 99" in err
    path.write_bytes(b"{not json")
    assert load_ceiling(path) is None  # nor does a broken file stop a run
    assert load_ceiling(tmp_path / "absent.json") is None
    assert capsys.readouterr().err.count("\n") == 1  # the broken file's line; none for absent


def test_the_levels_past_the_ceiling_are_named_at_its_share():
    below = int(CEILING_SHARE * 1000) - 1
    above = int(CEILING_SHARE * 1000) + 1
    assert ceiling_line(_calibration(_level(1, below, 1000))) is None
    line = ceiling_line(_calibration(_level(1, below, 1000), _level(8, above, 1000)))
    assert line is not None and "concurrency 8:" in line and f"{CEILING_SHARE:.0%}" in line
    assert not failed(_calibration(_level(1, below, 1000)))
    assert failed(_calibration(_level(1, below, 1000), _level(2, below, 1000, errors=1)))


def test_the_command_renders_the_fields_and_prints_the_json(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "300")
    result = _calibration(
        _level(1, 200, 30000), _level(4, 800, 900, errors=1, first_error="HTTP 500: boom")
    )

    async def measured(concurrencies, requests_per_level=None):
        return result

    monkeypatch.setattr(command, "run_calibration", measured)
    assert command.calibrate([1, 4]) == 1
    out = capsys.readouterr().out
    assert "Past the ceiling at concurrency 4:" in out and "concurrency 1," not in out
    assert "concurrency 4: first error: HTTP 500: boom" in out
    assert "3.25" in out and "30,000" in out  # the parse CPU and the ceiling of the levels
    assert not (tmp_path / "cputax" / "calibration.json").exists()  # a failed request: not kept
    assert command.calibrate([1, 4], as_json=True) == 1
    assert msgspec.json.decode(capsys.readouterr().out, type=Calibration) == result

    monkeypatch.setattr(command, "peers", lambda *args, **kwargs: _peers())
    assert command.calibrate([4], with_peers=True) == 0
    out = capsys.readouterr().out
    assert "1.50x" in out and "1.25-1.75x" in out and "aiperf: skipped: not installed" in out
