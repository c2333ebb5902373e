"""Load profiles: TOML files of scenarios, validated into Scenario records.

A bad profile fails before anything is sent, with one line naming the file, the
scenario and the key.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cputax.errors import CputaxError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Median system prompt + tool definitions of the 102 kv-cache-tester coding-agent
# traces (2,770 + 11,910 tokens): what every request of an agent shares.
AGENT_SHARED_PREFIX_TOKENS = 14_680
ARRIVALS = ("closed", "poisson", "burst")
DEFAULT_PROFILE = "smoke"


@dataclass(frozen=True)
class Scenario:
    """One load scenario. Closed-loop batches (the study's way) unless duration_s is set."""

    name: str
    concurrency: int
    context_tokens: int
    max_tokens: int = 64
    batches: int | None = None
    duration_s: float | None = None
    arrival: str = "closed"
    rate: float | None = None  # requests/s, poisson
    burst_size: int | None = None
    burst_every_s: float | None = None
    shared_prefix_tokens: int | None = None  # default: agent share, at most half the context
    warmup: int = 1  # unrecorded requests before measuring
    users: int = 0  # >0: requests are grouped into user sessions sharing a session prefix
    subagents_per_user: int = 0  # with users: each batch is users x (1 parent + N sub-agents)
    session_prefix_share: float = 0.85  # fraction of a sub-agent's context shared with its parent
    ignore_eos: bool = (
        True  # ask for exactly max_tokens (vLLM's ignore_eos); off for strict servers
    )

    @property
    def shared_prefix(self) -> int:
        if self.shared_prefix_tokens is not None:
            return self.shared_prefix_tokens
        return min(AGENT_SHARED_PREFIX_TOKENS, self.context_tokens // 2)

    @property
    def planned_requests(self) -> int | None:
        """Requests a closed-loop batch scenario sends (None when it runs for a duration)."""
        return None if self.batches is None else self.batches * self.concurrency

    def describe(self) -> str:
        if self.batches is not None:
            return f"{self.batches} batches x {self.concurrency}"
        if self.arrival == "poisson":
            return f"poisson {self.rate}/s for {self.duration_s:g}s"
        if self.arrival == "burst":
            return (
                f"bursts of {self.burst_size} every {self.burst_every_s:g}s "
                f"for {self.duration_s:g}s"
            )
        return f"closed loop x {self.concurrency} for {self.duration_s:g}s"


_FIELDS = {f.name: f for f in dataclasses.fields(Scenario)}
_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "concurrency": (int,),
    "context_tokens": (int,),
    "max_tokens": (int,),
    "batches": (int,),
    "duration_s": (int, float),
    "arrival": (str,),
    "rate": (int, float),
    "burst_size": (int,),
    "burst_every_s": (int, float),
    "shared_prefix_tokens": (int,),
    "warmup": (int,),
    "users": (int,),
    "subagents_per_user": (int,),
    "session_prefix_share": (int, float),
    "ignore_eos": (bool,),
}


class _Where:
    def __init__(self, path: Path, scenario: str):
        self.path, self.scenario = path, scenario

    def fail(self, key: str, why: str) -> CputaxError:
        return CputaxError(f"{self.path}: scenario {self.scenario!r}: key {key!r}: {why}")


def _check_types(raw: dict[str, Any], where: _Where) -> None:
    for key, value in raw.items():
        if key not in _TYPES:
            known = ", ".join(sorted(_TYPES))
            raise where.fail(key, f"unknown key (known: {known})")
        want = _TYPES[key]
        if isinstance(value, bool) and bool not in want or not isinstance(value, want):
            names = " or ".join(t.__name__ for t in want)
            raise where.fail(key, f"expected {names}, got {value!r}")


def _validate(raw: dict[str, Any], where: _Where) -> Scenario:
    _check_types(raw, where)
    data = dict(raw)
    users, subagents = data.get("users", 0), data.get("subagents_per_user", 0)
    if users < 0 or subagents < 0:
        raise where.fail("users" if users < 0 else "subagents_per_user", "must be >= 0")
    if subagents and not users:
        raise where.fail("subagents_per_user", "needs users > 0")
    if users:
        derived = users * (1 + subagents)
        if data.setdefault("concurrency", derived) != derived:
            raise where.fail(
                "concurrency",
                f"users x (1 + subagents_per_user) = {derived}; drop concurrency or make it match",
            )
    for key in ("name", "concurrency", "context_tokens"):
        if key not in data:
            raise where.fail(
                key, "missing (every scenario needs name, concurrency, context_tokens)"
            )
    for key in ("concurrency", "context_tokens", "max_tokens", "batches", "burst_size"):
        if key in data and data[key] <= 0:
            raise where.fail(key, f"must be positive, got {data[key]}")
    for key in ("duration_s", "rate", "burst_every_s"):
        if key in data and data[key] <= 0:
            raise where.fail(key, f"must be positive, got {data[key]}")
    if data.get("warmup", 0) < 0:
        raise where.fail("warmup", "must be >= 0")
    if not 0 <= data.get("session_prefix_share", 0.85) < 1:
        raise where.fail("session_prefix_share", "must be in [0, 1)")
    arrival = data.get("arrival", "closed")
    if arrival not in ARRIVALS:
        raise where.fail("arrival", f"must be one of {', '.join(ARRIVALS)}, got {arrival!r}")
    if "duration_s" in data:
        if "batches" in data:
            raise where.fail(
                "batches", "give batches (closed-loop batches) or duration_s, not both"
            )
    else:
        if arrival != "closed":
            raise where.fail("arrival", f"arrival {arrival!r} needs duration_s")
        data.setdefault("batches", 3)
    if arrival == "poisson" and "rate" not in data:
        raise where.fail("rate", "arrival 'poisson' needs rate (requests per second)")
    if arrival == "burst":
        for key in ("burst_size", "burst_every_s"):
            if key not in data:
                raise where.fail(key, "arrival 'burst' needs burst_size and burst_every_s")
    shared = data.get("shared_prefix_tokens")
    if shared is not None and not 0 <= shared < data["context_tokens"]:
        raise where.fail("shared_prefix_tokens", f"must be in [0, context_tokens), got {shared}")
    return Scenario(**data)


def load_profile(path: Path) -> list[Scenario]:
    """Read a profile: `[defaults]` (any scenario key) and `[[scenario]]` tables."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CputaxError(f"{path}: no such profile; see profiles/ for examples") from exc
    except IsADirectoryError as exc:
        raise CputaxError(f"{path}: is a directory; --profile names a .toml file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CputaxError(f"{path}: cannot read it ({exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise CputaxError(f"{path}: not valid TOML ({exc})") from exc
    extra = set(raw) - {"defaults", "scenario"}
    if extra:
        raise CputaxError(
            f"{path}: unknown top-level table(s) {sorted(extra)}: use [defaults] and [[scenario]]"
        )
    defaults = raw.get("defaults", {})
    if not isinstance(defaults, dict):
        raise CputaxError(f"{path}: [defaults] must be a table")
    _check_types({k: v for k, v in defaults.items() if k != "name"}, _Where(path, "[defaults]"))
    scenarios = raw.get("scenario", [])
    if not isinstance(scenarios, list) or not scenarios:
        raise CputaxError(f"{path}: no [[scenario]] tables")
    result: list[Scenario] = []
    seen: set[str] = set()
    for number, table in enumerate(scenarios, 1):
        name = table.get("name", f"#{number}")
        where = _Where(path, str(name))
        merged = {**defaults, **table}
        # A scenario's own batches / duration_s replaces the other one set in [defaults].
        for own, other in (("duration_s", "batches"), ("batches", "duration_s")):
            if own in table and other not in table:
                merged.pop(other, None)
        scenario = _validate(merged, where)
        if scenario.name in seen:
            raise where.fail("name", "duplicate scenario name")
        seen.add(scenario.name)
        result.append(scenario)
    return result


def resolve_profile(profile: Path | None) -> Path:
    """A path, or a bare name looked up in ./profiles and in the project's profiles/."""
    if profile is not None and (profile.exists() or profile.suffix or len(profile.parts) > 1):
        return profile
    name = f"{profile or DEFAULT_PROFILE}.toml"
    for root in (Path.cwd() / "profiles", Path(__file__).resolve().parents[3] / "profiles"):
        if (root / name).is_file():
            return root / name
    raise CputaxError(f"profile {name!r} not found in ./profiles; pass --profile PATH")


def select(scenarios: list[Scenario], names: list[str] | None, path: Path) -> list[Scenario]:
    if not names:
        return scenarios
    known = {s.name for s in scenarios}
    missing = [n for n in names if n not in known]
    if missing:
        raise CputaxError(
            f"{path}: no scenario named {', '.join(missing)} (has: {', '.join(sorted(known))})"
        )
    return [s for s in scenarios if s.name in names]


# --- py-spy's overhead: each scenario also unsampled ----------------------------------------
CONTROL_SUFFIX = "-nopyspy"


def with_controls(scenarios: list[Scenario]) -> list[Scenario]:
    """Each scenario twice, sampled and unsampled (NAME-nopyspy), the order alternating."""
    out: list[Scenario] = []
    for i, s in enumerate(scenarios):
        control = dataclasses.replace(s, name=s.name + CONTROL_SUFFIX)
        out += [s, control] if i % 2 == 0 else [control, s]
    return out


def is_control(name: str) -> bool:
    return name.endswith(CONTROL_SUFFIX)
