"""`cputax replay`: trace parsing, prompt text from block ids, the driver's pacing, and whole
replays over real HTTP against the stub. Traces are small synthetic ones written here; one
test reads a real trace from ../shared and skips when it is not there."""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from helpers import expected_exit
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from cputax.client.sessions import Pacing, Replay
from cputax.commands.replay import ReplayOptions, replay
from cputax.errors import CputaxError
from cputax.records import RequestRecord, read_json, read_requests
from cputax.session import RunOptions
from cputax.targets.stub import StubConfig, StubServer
from cputax.text.conversation import render_chat
from cputax.text.corpus import make_corpus
from cputax.text.tokenizer import LoadedTokenizer, load_tokenizer
from cputax.workload.blocks import BlockTexts
from cputax.workload.prompts import ReplayPrompts, local_counter
from cputax.workload.traces import TraceError, load_conversations, parse_trace, trace_hit_rate, trim

REAL_TRACE = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "traces"
    / "kv-cache-tester"
    / "trace_0010.json.gz"
)
MS = 1_000_000


def req(
    t: float, n_in: int, ids: list[int], think: float = 0.0, out: int = 4, api: float = 0.1
) -> dict:
    return {
        "t": t,
        "type": "n",
        "in": n_in,
        "out": out,
        "hash_ids": ids,
        "think_time": think,
        "api_time": api,
    }


def agent_trace(trace_id: str = "t1", think: float = 1.0) -> dict:
    """A parent with three turns and one sub-agent spawned right after the first response."""
    return {
        "id": trace_id,
        "block_size": 64,
        "hash_id_scope": "local",
        "tool_tokens": 100,
        "system_tokens": 50,
        "requests": [
            req(0.0, 300, [1, 2, 3, 4], api=1.0),
            {
                "t": 1.0,
                "type": "subagent",
                "agent_id": "sa",
                "requests": [
                    req(0.0, 200, [10, 11, 12], api=0.2),
                    req(0.7, 260, [10, 11, 12, 13], think=0.5),
                ],
            },
            req(2.0, 420, [1, 2, 3, 4, 5, 6], think=think),
            req(4.0, 500, [1, 2, 3, 4, 5, 6, 7], think=think),
        ],
    }


def write(path: Path, obj: dict, gz: bool = False) -> Path:
    raw = json.dumps(obj).encode()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


# --- parsing -------------------------------------------------------------------------------------


def test_parse_keeps_order_subagents_and_delays():
    conv = parse_trace(json.dumps(agent_trace()).encode(), "t1.json")
    assert conv.id == "t1" and conv.block_size == 64 and conv.scope == "t1"
    requests = conv.main.requests()
    assert [r.turn for r in requests] == [0, 1, 2] and [r.in_tokens for r in requests] == [
        300,
        420,
        500,
    ]
    (sub,) = conv.main.subagents()
    assert sub.agent.id == "sa" and sub.delay_s == pytest.approx(
        0.0
    )  # spawned as the first response ended
    assert [r.think_s for r in sub.agent.requests()] == [0.0, 0.5]
    assert [r.in_tokens for _, _, r in conv.timeline()] == [300, 200, 260, 420, 500]
    assert conv.count_requests() == 5 and conv.count_subagents() == 1


def test_trim_skips_over_context_and_limits_in_trace_time():
    conv = trim(
        parse_trace(json.dumps(agent_trace()).encode(), "t1.json"), max_context=420, limit=3
    )
    assert (
        conv.skipped == 1 and conv.dropped == 1
    )  # 500 is over; then the first 3 of 300, 200, 260, 420
    assert [r.in_tokens for _, _, r in conv.timeline()] == [300, 200, 260]
    assert conv.count_subagents() == 1
    conv = trim(
        parse_trace(json.dumps(agent_trace()).encode(), "t1.json"), max_context=None, limit=1
    )
    assert (
        conv.count_subagents() == 0 and conv.count_requests() == 1
    )  # the sub-agent lost all its requests


def test_trace_hit_rate_counts_blocks_seen_before():
    conv = parse_trace(json.dumps(agent_trace()).encode(), "t1.json")
    # hits: 420 -> 4 blocks, 500 -> 6 blocks, the sub-agent's second -> 3 blocks
    assert trace_hit_rate(conv) == pytest.approx((4 + 6 + 3) * 64 / (300 + 200 + 260 + 420 + 500))


@pytest.mark.parametrize(
    "mutate, where, field",
    [
        (lambda d: d["requests"][2].pop("in"), "requests[2]", "in"),
        (
            lambda d: d["requests"][1]["requests"][1].update(out=-1),
            "requests[1].requests[1]",
            "out",
        ),
        (lambda d: d["requests"][0].update(hash_ids="abc"), "requests[0]", "hash_ids"),
        (lambda d: d["requests"][0].update(hash_ids=list(range(9))), "requests[0]", "hash_ids"),
        (lambda d: d["requests"][3].update(t=None), "requests[3]", "t"),
    ],
)
def test_bad_fields_name_file_request_and_field(tok, tmp_path, mutate, where, field):
    data = agent_trace()
    mutate(data)
    write(tmp_path / "bad.json", data)
    write(tmp_path / "good.json.gz", agent_trace("good"), gz=True)
    conversations, errors = load_conversations([tmp_path], tok)
    assert [c.id for c in conversations] == ["good"]  # the other file still loads
    (error,) = errors
    assert error.startswith(f"bad.json: request {where}: field '{field}'"), error


def test_unreadable_files_are_one_error_each(tok, tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    (tmp_path / "b.json.gz").write_bytes(b"\x1f\x8b not really gzip")
    (tmp_path / "README.md").write_text("not a trace")
    conversations, errors = load_conversations([tmp_path], tok)
    assert not conversations and len(errors) == 2
    assert errors[0].startswith("a.json: not valid JSON") and errors[1].startswith(
        "b.json.gz: not a readable gzip"
    )
    with pytest.raises(TraceError, match="top level: expected a JSON object"):
        parse_trace(b"[1, 2]", "c.json")


def test_jsonl_conversations_become_one_request_per_assistant_turn(tok, tmp_path):
    messages = [
        {"role": "system", "content": "You are a coding agent."},
        {"role": "user", "content": "Fix the parser."},
        {"role": "assistant", "content": "Reading src/parser.py now."},
        {"role": "user", "content": "Also run the tests."},
        {"role": "assistant", "content": "All 12 tests pass."},
        {"role": "user", "content": "Thanks, summarize."},
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text(
        json.dumps(messages)
        + "\n"
        + json.dumps({"id": "x", "messages": [{"role": "nobody"}]})
        + "\n"
    )
    _, errors = load_conversations([path], tok)
    assert errors == [
        "mine.jsonl: line 2: messages[0]: field 'role': expected one of system, developer, "
        "user, assistant, tool, got 'nobody'"
    ]
    path.write_text(json.dumps(messages) + "\n")
    (conv,), errors = load_conversations([path], tok)
    requests = conv.main.requests()
    assert [len(r.messages) for r in requests] == [2, 4, 6]
    assert requests[0].out_tokens == tok.count("Reading src/parser.py now.")
    assert requests[0].in_tokens == tok.count(render_chat(messages[:2]))
    # the second prompt extends the first: their leading blocks share ids
    assert requests[1].hash_ids[: len(requests[0].hash_ids)] == requests[0].hash_ids


# --- prompt text ---------------------------------------------------------------------------------


def test_block_text_is_exact_alone_and_in_sequence(tok):
    blocks = BlockTexts(tok, 64)
    texts = [blocks.block("s", i) for i in range(40)]
    assert all(tok.count(t) == 64 for t in texts)
    assert blocks.block("s", 7) == texts[7] and blocks.block("other", 7) != texts[7]
    assert tok.count("".join(texts)) == 64 * 40
    assert tok.count("".join(reversed(texts[::3]))) == 64 * len(texts[::3])


def _tiny_bpe() -> LoadedTokenizer:
    """Another tokenizer: a small GPT-2-style byte-level BPE trained here."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(
        [make_corpus(3000, load_tokenizer(), seed=s) for s in range(3)], trainer
    )
    return LoadedTokenizer(bpe, "tiny-bpe", "trained in the test")


@pytest.mark.parametrize("size", [16, 32])
def test_other_block_sizes_and_tokenizers(size):
    bpe = _tiny_bpe()
    blocks = BlockTexts(bpe, size)
    texts = [blocks.block("s", i) for i in range(30)]
    assert all(bpe.count(t) == size for t in texts)
    assert bpe.count("".join(texts)) == size * 30


def _prepared(tok: LoadedTokenizer, conversations) -> ReplayPrompts:
    prompts = ReplayPrompts(tok, "m", ignore_eos=True)
    asyncio.run(prompts.prepare(local_counter(tok), conversations))
    return prompts


class RecordingClient:
    """Answers at once and keeps every payload: the driver and the prompts without HTTP."""

    def __init__(self) -> None:
        self.payloads: list[dict] = []

    async def send(self, record: RequestRecord, build) -> RequestRecord:
        record.t_start = time.monotonic_ns()
        self.payloads.append(build())
        record.t_sent = record.t_headers = record.t_first_token = record.t_last_token = (
            time.monotonic_ns()
        )
        record.t_end, record.ok = time.monotonic_ns(), True
        return record


def _replay_offline(tok, conversations, users: int = 10, scale: float = 0.0):
    prompts = _prepared(tok, conversations)
    client, records = RecordingClient(), []
    asyncio.run(Replay(client, prompts, Pacing(users, scale), records.append).run(conversations))
    return client.payloads, records


def test_equal_hash_ids_give_identical_text_and_tokens(tok):
    conv = parse_trace(json.dumps(agent_trace()).encode(), "t1.json")
    payloads, records = _replay_offline(tok, [conv])
    by_in = {
        r.target_prompt_tokens: p["messages"][0]["content"]
        for r, p in zip(records, payloads, strict=True)
    }
    first, second, third = by_in[300], by_in[420], by_in[500]
    ids = [tok.tokenizer.encode(t, add_special_tokens=False).ids for t in (first, second, third)]
    assert ids[1][: 4 * 64] == ids[0][: 4 * 64] and ids[2][: 6 * 64] == ids[1][: 6 * 64]
    assert second[:100] == first[:100] and ids[1][4 * 64] != ids[0][4 * 64]  # block 5 is new text
    sub_first, sub_second = by_in[200], by_in[260]
    assert sub_second.startswith(sub_first[: len(sub_first) - 40]) and sub_first[:50] != first[:50]
    # each whole prompt is `in` tokens with the template
    for r, p in zip(records, payloads, strict=True):
        assert tok.count(render_chat(p["messages"])) == r.target_prompt_tokens
        assert p["max_tokens"] == 4 and p["ignore_eos"] is True


def test_template_longer_than_the_tail_shortens_the_last_block(tok):
    trace = {"id": "x", "block_size": 64, "requests": [req(0, 128, [1, 2]), req(1, 130, [1, 2])]}
    payloads, records = _replay_offline(tok, [parse_trace(json.dumps(trace).encode(), "x.json")])
    for r, p in zip(records, payloads, strict=True):
        assert abs(tok.count(render_chat(p["messages"])) - r.target_prompt_tokens) <= 1


def test_ideal_cache_and_turn_order_offline(tok):
    conv = parse_trace(json.dumps(agent_trace()).encode(), "t1.json")
    _, records = _replay_offline(tok, [conv])
    parent = [r for r in records if r.subagent is None]
    assert [r.turn for r in parent] == [0, 1, 2]
    assert [r.extra["ideal_hit_tokens"] for r in parent] == [0, 256, 384]
    sub = [r for r in records if r.subagent == "sa"]
    assert (
        [r.turn for r in sub] == [0, 1]
        and sub[0].extra["parent"] == "main"
        and sub[0].extra["after_turn"] == 0
    )


def test_users_cap_sessions_at_once(tok):
    convs = [
        parse_trace(json.dumps(agent_trace(f"c{i}", think=0.01)).encode(), f"c{i}.json")
        for i in range(3)
    ]
    for c in convs:
        c.scope = c.id
    _, records = _replay_offline(tok, convs, users=1, scale=1.0)
    spans = {}
    for r in records:
        lo, hi = spans.get(r.session, (r.t_start, r.t_end))
        spans[r.session] = (min(lo, r.t_start), max(hi, r.t_end))
    ordered = sorted(spans.values())
    assert all(a[1] <= b[0] for a, b in zip(ordered, ordered[1:], strict=False))


def test_real_trace_prompts(tok):
    if not REAL_TRACE.exists():
        pytest.skip("../shared/traces is not beside this checkout")
    (conv,), errors = load_conversations([REAL_TRACE], tok)
    assert not errors and conv.count_subagents() == 4 and 0.9 < trace_hit_rate(conv) < 0.97
    trim(conv, max_context=23_000, limit=3)
    payloads, records = _replay_offline(tok, [conv])
    for r, p in zip(records, payloads, strict=True):
        assert abs(tok.count(render_chat(p["messages"])) - r.target_prompt_tokens) <= 1


# --- whole replays over HTTP against the stub ---------------------------------------------------

STUB = StubConfig(headers_delay_ms=20, first_token_delay_ms=30, inter_token_delay_ms=5)
SCALE = 0.2


@pytest.fixture(scope="module")
def replay_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replay")
    traces = tmp / "traces"
    traces.mkdir()
    write(traces / "t1.json.gz", agent_trace(), gz=True)
    bad = agent_trace("bad")
    del bad["requests"][1]["requests"][0]["in"]
    write(traces / "bad.json", bad)
    with StubServer(STUB) as stub:
        options = RunOptions(endpoint=stub.url, out=tmp / "out")
        code = replay(ReplayOptions(paths=[traces], run=options, time_scale=SCALE))
    assert code == expected_exit(tmp / "out")
    return tmp / "out"


def test_replay_sends_every_request_in_order(replay_dir):
    records = read_requests(replay_dir / "requests.jsonl")
    assert len(records) == 5 and all(r.ok for r in records)
    assert all(r.session == "t1" and r.scenario == "replay" for r in records)
    parent = sorted((r for r in records if r.subagent is None), key=lambda r: r.t_start)
    assert [r.turn for r in parent] == [0, 1, 2]
    assert [
        r.turn for r in sorted((r for r in records if r.subagent == "sa"), key=lambda r: r.t_start)
    ] == [0, 1]
    # the stub counts prompts with the same tokenizer and template: every prompt is `in` tokens
    assert all(r.prompt_tokens == r.target_prompt_tokens for r in records)


def test_think_times_are_scaled(replay_dir):
    records = read_requests(replay_dir / "requests.jsonl")
    parent = sorted((r for r in records if r.subagent is None), key=lambda r: r.turn)
    for before, after in zip(parent, parent[1:], strict=False):
        gap_ms = (after.extra["ready_ns"] - before.t_end) / MS
        # never early; late by less than the think time itself (a wait not scaled, 5x, or
        # taken twice, 2x, fails; a loaded machine's late wake-up does not)
        assert 1000 * SCALE - 2 <= gap_ms < 2 * 1000 * SCALE, gap_ms
    sub = sorted((r for r in records if r.subagent == "sa"), key=lambda r: r.turn)
    # trace delay 0: the sub-agent's start is its parent's response end, by reckoning (no clock)
    assert sub[0].extra["agent_start_ns"] == parent[0].t_end
    assert 500 * SCALE - 2 <= (sub[1].extra["ready_ns"] - sub[0].t_end) / MS < 2 * 500 * SCALE


def test_subagent_runs_beside_its_parent(replay_dir):
    records = read_requests(replay_dir / "requests.jsonl")
    parent2 = next(r for r in records if r.subagent is None and r.turn == 1)
    sub2 = next(r for r in records if r.subagent == "sa" and r.turn == 1)
    assert sub2.t_start < parent2.t_end and parent2.t_start < sub2.t_end  # in flight together
    agentic = orjson.loads((replay_dir / "summary.json").read_bytes())["agentic"]
    assert agentic["concurrency"]["agents_max"] == 2 and agentic["concurrency"]["requests_max"] == 2
    (session,) = agentic["sessions"]
    path = session["critical_path"]
    assert session["subagents"] == 1 and path["chain"][0] == "main"
    assert sum(path["ms"].values()) == pytest.approx(1000 * path["wall_s"], rel=0.01)


def test_bad_file_reported_and_the_rest_replayed(replay_dir):
    info = read_json(replay_dir / "run.json")
    assert info["replay"]["trace_errors"] == [
        "bad.json: request requests[1].requests[0]: field 'in': missing"
    ]
    report = (replay_dir / "report.md").read_text()
    assert "## Agentic replay" in report and "not replayed: bad.json" in report
    assert "| replay | 1 |" in report


def test_replay_prefix_cache_rates(replay_dir):
    agentic = orjson.loads((replay_dir / "summary.json").read_bytes())["agentic"]
    assert agentic["prefix_cache"]["server"] is None  # the stub exports no prefix-cache counters
    assert agentic["prefix_cache"]["replayed_ideal"] == pytest.approx((4 + 6 + 3) * 64 / 1680)


def test_option_checks():
    with pytest.raises(CputaxError, match="--time-scale must be >= 0"):
        replay(ReplayOptions(paths=[Path(".")], time_scale=-1))
    with pytest.raises(CputaxError, match="--users must be a positive integer"):
        replay(ReplayOptions(paths=[Path(".")], users=0))


def test_cli_bad_trace_only_is_one_clear_line(tmp_path):
    data = agent_trace()
    data["requests"][2]["hash_ids"] = None
    write(tmp_path / "bad.json", data)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cputax.cli",
            "replay",
            str(tmp_path / "bad.json"),
            "--endpoint",
            "http://127.0.0.1:9",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "bad.json: request requests[2]: field 'hash_ids'" in last and last.startswith(
        "cputax replay: error"
    )
