"""A sweep's plan: knobs (`--vary KNOB=V1,V2` or a preset name) -> server configurations ->
the order they run in.

Every combination of the knobs' values is one configuration; the first is the baseline
the others are compared with. With `repeat` > 1 the order alternates (A B, B A, A B...),
so that drift over the sweep (a warming cache, another tenant on the machine) does not
masquerade as the effect of a knob.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass

from cputax.errors import CputaxError
from cputax.servers import Preset

__all__ = [
    "OWN_KNOBS",
    "Configuration",
    "Knob",
    "ServerFlags",
    "Step",
    "configurations",
    "parse_help",
    "parse_vary",
    "plan",
]

# Knobs cputax applies itself (RunOptions fields: the emulated GPU), not server flags
OWN_KNOBS = {"gpu-speed": "gpu_speed", "emulate-gpu": "emulate_gpu"}
ON = ("on", "true", "yes")
OFF = ("off", "false", "no")
_FLAG = re.compile(r"(?<![\w-])--([a-z0-9][a-z0-9-]*)")
_CHOICES = re.compile(r"--([a-z0-9][a-z0-9-]*)\s+\{([^}]*)\}")


@dataclass(frozen=True)
class Knob:
    flag: str  # without the leading --
    value: str

    def args(self) -> tuple[str, ...]:
        """On the server's command line: --flag / --no-flag for on/off, else --flag VALUE."""
        if self.value.lower() in ON:
            return (f"--{self.flag}",)
        if self.value.lower() in OFF:
            return (f"--no-{self.flag}",)
        return (f"--{self.flag}", self.value)

    @property
    def label(self) -> str:
        return f"{self.flag}={self.value}"


@dataclass(frozen=True)
class Configuration:
    knobs: tuple[Knob, ...]

    @property
    def name(self) -> str:
        return ",".join(k.label for k in self.knobs)

    @property
    def slug(self) -> str:
        """A folder name: the knobs' values, readable and safe."""
        return (
            re.sub(r"[^A-Za-z0-9_.=-]+", "_", "__".join(k.label for k in self.knobs)).replace(
                "=", "-"
            )
            or "_"
        )

    def args(self) -> tuple[str, ...]:
        """The server's flags (cputax's own knobs left out)."""
        return tuple(a for k in self.knobs if k.flag not in OWN_KNOBS for a in k.args())

    def own_options(self) -> dict[str, object]:
        """cputax's own knobs as RunOptions fields: gpu_speed (a float, inf allowed) and
        emulate_gpu."""
        out: dict[str, object] = {}
        for k in self.knobs:
            if k.flag == "gpu-speed":
                try:
                    out["gpu_speed"] = float(k.value)
                except ValueError:
                    raise CputaxError(
                        f"--vary gpu-speed: {k.value!r} is not a number (inf allowed)"
                    ) from None
            elif k.flag in OWN_KNOBS:
                out[OWN_KNOBS[k.flag]] = k.value
        return out


@dataclass(frozen=True)
class Step:
    """One server start and one run of the profile: a configuration, its repeat number."""

    configuration: Configuration
    repeat: int

    @property
    def folder(self) -> str:
        return (
            self.configuration.slug
            if self.repeat == 0
            else f"{self.configuration.slug}-r{self.repeat}"
        )


@dataclass(frozen=True)
class ServerFlags:
    """What the server's --help says it takes: its flags, and the choices of those that list
    them."""

    flags: frozenset[str]
    choices: Mapping[str, tuple[str, ...]]

    def knows(self, knob: Knob) -> bool:
        if knob.value.lower() in ON + OFF:
            return knob.flag in self.flags or f"no-{knob.flag}" in self.flags
        return knob.flag in self.flags or knob.flag in OWN_KNOBS


def parse_help(text: str) -> ServerFlags:
    """Flags and their {a,b,c} choices from an argparse --help text."""
    choices = {
        m[1]: tuple(c.strip() for c in m[2].split(",") if c.strip())
        for m in _CHOICES.finditer(text)
    }
    return ServerFlags(frozenset(_FLAG.findall(text)), choices)


def parse_vary(
    text: str, presets: Mapping[str, Preset], flags: ServerFlags | None = None
) -> tuple[list[Knob], Preset | None]:
    """`--vary KNOB=V1,V2[,...]` or `--vary PRESET`: the knob's values, and the preset if it
    was one.

    A preset that takes its values from the server's --help keeps those of its values the
    server lists (vLLM before 0.19 has no xxhash)."""
    if "=" not in text:
        preset = presets.get(text)
        if preset is None:
            raise CputaxError(
                f"--vary {text}: not a preset ({', '.join(presets)}) and not KNOB=V1,V2"
            )
        values = preset.values
        if preset.from_help and flags is not None and preset.flag in flags.choices:
            listed = flags.choices[preset.flag]
            keep = [v for v in values if v in listed]
            values = tuple((keep + [c for c in listed if c not in keep])[: max(2, len(keep))])
        return [Knob(preset.flag, v) for v in values], preset
    flag, _, raw = text.partition("=")
    flag = flag.strip().removeprefix("--")
    values = [v.strip() for v in raw.split(",") if v.strip()]
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", flag) or len(values) < 1:
        raise CputaxError(
            f"--vary {text}: expected KNOB=V1,V2 (a server flag without --, e.g. "
            "api-server-count=1,2) or a preset name"
        )
    preset = next((p for p in presets.values() if p.flag == flag), None)
    return [Knob(flag, v) for v in values], preset


def configurations(varies: list[list[Knob]]) -> list[Configuration]:
    """Every combination of the knobs' values, the first value of each first (the baseline)."""
    if not varies:
        raise CputaxError("a sweep needs at least one --vary")
    flags = [v[0].flag for v in varies]
    if len(set(flags)) != len(flags):
        raise CputaxError(
            "--vary names a knob twice: "
            f"{', '.join(sorted(f for f in flags if flags.count(f) > 1))}"
        )
    return [Configuration(tuple(combo)) for combo in itertools.product(*varies)]


def plan(configs: list[Configuration], repeat: int = 1) -> list[Step]:
    """The order of the runs: the configurations in order, then backwards, and so on."""
    if repeat < 1:
        raise CputaxError(f"--repeat must be at least 1, got {repeat}")
    steps = []
    for r in range(repeat):
        order = configs if r % 2 == 0 else list(reversed(configs))
        steps += [Step(c, r) for c in order]
    return steps
