"""requests.jsonl read as columns (RequestTable) against the records read one by one."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from cputax import records as records_module
from cputax.errors import CputaxError
from cputax.records import (
    JsonlWriter,
    RequestRecord,
    RequestTable,
    read_request_table,
    read_requests,
)


def _records(n: int) -> list[RequestRecord]:
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        t0 = int(rng.integers(1, 10**15))
        r = RequestRecord(
            scenario=f"s{i % 3}",
            index=i,
            batch=i // 7 if i % 2 else None,
            t_start=t0,
            t_sent=t0 + 1000,
            chunks=int(rng.integers(0, 99)),
            build_s=float(rng.random()),
        )
        if i % 5:
            r.ok, r.status, r.t_headers, r.t_first_token, r.t_last_token, r.t_end = (
                True,
                200,
                t0 + 2000,
                t0 + 3000,
                t0 + 9000,
                t0 + 9100,
            )
            r.t_first_token_kernel = t0 + 2900 if i % 3 else None
            r.output_tokens, r.output_tokens_source = 64, "usage" if i % 4 else "chunks"
        else:
            r.error, r.t_end = f"HTTP 400: bad {i}", t0 + 1500
        if i % 11 == 0:
            r.session, r.turn, r.extra = f"sess{i}", 1, {"trace_in": i}
        out.append(r)
    return out


def _same(table: RequestTable, records: list[RequestRecord]) -> None:
    assert len(table) == len(records)
    for name in table.columns:
        expected = np.array([getattr(r, name) for r in records], dtype=np.float64)
        assert np.array_equal(table[name], expected, equal_nan=True), name
    assert table.ok.tolist() == [r.ok for r in records]
    assert [table.scenarios[c] for c in table.scenario] == [r.scenario for r in records]
    assert [None if c < 0 else table.sources[c] for c in table.source] == [
        r.output_tokens_source for r in records
    ]
    assert table.error.tolist() == [r.error for r in records]
    assert [(r.session, r.extra) for r in table.replayed] == [
        (r.session, r.extra) for r in records if r.session
    ]


def test_columns_hold_what_the_records_hold(tmp_path):
    records = _records(500)
    path = tmp_path / "requests.jsonl"
    with JsonlWriter(path) as w:
        for r in records:
            w.write(r)
    _same(read_request_table(path), records)
    _same(RequestTable.from_records(records), records)
    _same(read_request_table(path), read_requests(path))


def test_a_file_split_over_processes_reads_the_same(tmp_path, monkeypatch):
    records = _records(3000)
    path = tmp_path / "requests.jsonl"
    with JsonlWriter(path) as w:
        for r in records:
            w.write(r)
    monkeypatch.setattr(records_module, "SPLIT_BYTES", path.stat().st_size // 5)
    monkeypatch.setattr(records_module, "BLOCK", 97)  # blocks that do not line up with the ranges
    _same(read_request_table(path, workers=3), records)


def test_subsets_and_old_records_without_the_newer_fields(tmp_path):
    path = tmp_path / "requests.jsonl"
    old = {
        "scenario": "a",
        "ok": True,
        "t_start": 0,
        "t_sent": 5,
        "t_headers": 7,
        "t_first_token": 9,
        "t_last_token": 20,
        "t_end": 21,
        "chunks": 3,
    }  # written before kernel stamps existed
    path.write_bytes(
        orjson.dumps(old) + b"\n" + orjson.dumps({**old, "scenario": "b", "ok": False}) + b"\n"
    )
    table = read_request_table(path)
    assert np.isnan(table["t_first_token_kernel"]).all()
    a = table.of_scenario("a")
    assert len(a) == 1 and a["t_end"].tolist() == [21.0] and len(table.of_scenario("missing")) == 0


def test_a_torn_last_line_is_skipped_a_bad_line_elsewhere_named(tmp_path):
    path = tmp_path / "requests.jsonl"
    line = RequestRecord(scenario="s", ok=True).to_json()
    path.write_bytes(
        line + b"\n\n" + line + b"\n" + line[:20]
    )  # a blank line, then a crash mid-write
    assert len(read_request_table(path)) == 2
    path.write_bytes(line + b"\n" + b'{"scenario": 3}\n' + line + b"\n")
    with pytest.raises(CputaxError, match=r"requests.jsonl:2: not a request record"):
        read_request_table(path)
