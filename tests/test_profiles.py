"""Profile validation: good profiles load; each bad key gets one line naming file, scenario, key."""

from pathlib import Path

import pytest

from cputax.errors import CputaxError
from cputax.workload.profiles import AGENT_SHARED_PREFIX_TOKENS, load_profile

PROFILES = Path(__file__).resolve().parents[1] / "profiles"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("name", "count"),
    [("smoke", 5), ("study-matrix", 8), ("subagent-burst", 2), ("pyspy-overhead", 4)],
)
def test_shipped_profiles_load(name, count):
    scenarios = load_profile(PROFILES / f"{name}.toml")
    assert len(scenarios) == count
    assert len({s.name for s in scenarios}) == len(scenarios)


def test_study_matrix_is_the_studys_eight_scenarios():
    scenarios = load_profile(PROFILES / "study-matrix.toml")
    got = [(s.name, s.concurrency, s.context_tokens, s.max_tokens, s.batches) for s in scenarios]
    assert got == [
        ("single_1k", 1, 1000, 64, 3),
        ("single_8k", 1, 8000, 64, 3),
        ("single_32k", 1, 32000, 64, 3),
        ("single_100k", 1, 100000, 64, 3),
        ("conc4_8k", 4, 8000, 64, 3),
        ("conc16_32k", 16, 32000, 64, 3),
        ("conc32_32k", 32, 32000, 64, 3),
        ("conc32_100k", 32, 100000, 64, 3),
    ]


def test_subagent_burst_is_four_users_of_thirteen():
    first = load_profile(PROFILES / "subagent-burst.toml")[0]
    assert (first.users, first.subagents_per_user, first.concurrency) == (4, 12, 52)


def test_defaults_apply_and_scenario_overrides(tmp_path):
    path = write(
        tmp_path,
        """
[defaults]
max_tokens = 16
batches = 2
[[scenario]]
name = "a"
concurrency = 2
context_tokens = 500
[[scenario]]
name = "b"
concurrency = 1
context_tokens = 40000
max_tokens = 8
""",
    )
    a, b = load_profile(path)
    assert (a.max_tokens, a.batches, a.planned_requests) == (16, 2, 4)
    assert b.max_tokens == 8
    assert a.shared_prefix == 250  # half the context when that is below the agent share
    assert b.shared_prefix == AGENT_SHARED_PREFIX_TOKENS


def test_open_loop_scenarios(tmp_path):
    path = write(
        tmp_path,
        """
[[scenario]]
name = "p"
concurrency = 4
context_tokens = 1000
duration_s = 5
arrival = "poisson"
rate = 2.5
[[scenario]]
name = "b"
concurrency = 4
context_tokens = 1000
duration_s = 5
arrival = "burst"
burst_size = 8
burst_every_s = 1
""",
    )
    p, b = load_profile(path)
    assert p.batches is None and p.planned_requests is None and p.rate == 2.5
    assert b.burst_size == 8


@pytest.mark.parametrize(
    "body, key",
    [
        ("concurrency = 2\ncontext_tokens = 100\nbogus = 1", "bogus"),
        ("concurrency = 0\ncontext_tokens = 100", "concurrency"),
        ('concurrency = "4"\ncontext_tokens = 100', "concurrency"),
        ("concurrency = 2", "context_tokens"),
        ('concurrency = 2\ncontext_tokens = 100\narrival = "poisson"', "arrival"),
        ('concurrency = 2\ncontext_tokens = 100\nduration_s = 3\narrival = "poisson"', "rate"),
        (
            "concurrency = 2\ncontext_tokens = 100\n"
            'duration_s = 3\narrival = "burst"\nburst_size = 2',
            "burst_every_s",
        ),
        ("concurrency = 2\ncontext_tokens = 100\nduration_s = 3\nbatches = 2", "batches"),
        ('concurrency = 2\ncontext_tokens = 100\narrival = "storm"\nduration_s = 1', "arrival"),
        (
            "concurrency = 2\ncontext_tokens = 100\nshared_prefix_tokens = 100",
            "shared_prefix_tokens",
        ),
        ("users = 2\nsubagents_per_user = 3\nconcurrency = 5\ncontext_tokens = 100", "concurrency"),
        ("subagents_per_user = 3\nconcurrency = 5\ncontext_tokens = 100", "subagents_per_user"),
        ("concurrency = 2\ncontext_tokens = 100\nignore_eos = 1", "ignore_eos"),
    ],
)
def test_bad_values_name_file_scenario_and_key(tmp_path, body, key):
    path = write(tmp_path, f'[[scenario]]\nname = "s1"\n{body}\n')
    with pytest.raises(CputaxError) as err:
        load_profile(path)
    message = str(err.value)
    assert str(path) in message and "'s1'" in message and f"'{key}'" in message
    assert "\n" not in message


def test_bad_files(tmp_path):
    with pytest.raises(CputaxError, match="no such profile"):
        load_profile(tmp_path / "missing.toml")
    with pytest.raises(CputaxError, match="not valid TOML"):
        load_profile(write(tmp_path, "[[scenario]\n"))
    with pytest.raises(CputaxError, match="no \\[\\[scenario\\]\\]"):
        load_profile(write(tmp_path, "[defaults]\nmax_tokens = 3\n"))
    with pytest.raises(CputaxError, match="duplicate"):
        load_profile(
            write(
                tmp_path,
                '[[scenario]]\nname="a"\nconcurrency=1\ncontext_tokens=9\n'
                '[[scenario]]\nname="a"\nconcurrency=1\ncontext_tokens=9\n',
            )
        )
    with pytest.raises(CputaxError, match="'\\[defaults\\]'.*'bogus'"):
        load_profile(
            write(
                tmp_path,
                '[defaults]\nbogus = 1\n[[scenario]]\nname="a"\nconcurrency=1\ncontext_tokens=9\n',
            )
        )
