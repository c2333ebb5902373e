"""How long the emulated GPU takes for one model step: a roofline over the batch vLLM
scheduled, with its coefficients read from a TOML preset a user can copy and edit.

    step = overhead + context_s * max context + max(compute, memory)   (then / gpu_speed)
    compute = (2 * active_params * tokens + attention FLOPs) / (gpus * peak_flops * flops_eff)
    memory  = (weights read + KV bytes read) / (gpus * mem_bandwidth * bandwidth_eff)

Attention FLOPs of a request that runs q new tokens over s tokens of context (s counts
the new ones): 4 * layers * attention_dim * q * (s - (q - 1) / 2), causal. Weights read:
all parameters of a dense model; of a MoE, the active ones per token until every expert
was touched. `context_s_per_token` is an empirical term (default 0) for what a roofline
does not explain: the `study` preset needs it to match the study's published decode times.

Pure Python on purpose: the measuring side reads presets (KV capacity, run.json) without
torch or vLLM.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from cputax.errors import CputaxError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["NONE", "TimingModel", "load_timing", "preset_names"]

NONE = "none"  # --emulate-gpu none: the real (tiny) model on the CPU


@dataclass(frozen=True)
class TimingModel:
    """One emulated GPU (or group of `gpus` under tensor parallelism) serving one model."""

    name: str
    description: str = ""
    # the GPU(s): per-GPU peak dense FLOP/s and memory bandwidth (bytes/s), memory (bytes)
    gpu: str = ""
    gpus: int = 1
    peak_flops: float = 0.0
    mem_bandwidth: float = 0.0
    memory_bytes: float = 0.0
    flops_efficiency: float = 1.0
    bandwidth_efficiency: float = 1.0
    step_overhead_s: float = 0.0
    context_s_per_token: float = 0.0
    # the model
    model: str = ""
    params: float = 0.0
    active_params: float = 0.0
    bytes_per_param: float = 2.0
    layers: int = 0
    attention_dim: int = 0  # query heads x head size
    kv_bytes_per_token: float = 0.0  # all layers, all GPUs together
    memory_utilization: float = 0.9  # of the GPUs' memory, for weights + KV cache
    block_size: int = 16
    gpu_speed: float = 1.0  # --gpu-speed: every step time divided by this (inf: no GPU time)
    source: str = ""  # the preset's name or file

    @property
    def infinite(self) -> bool:
        return math.isinf(self.gpu_speed) or self.peak_flops <= 0 and self.mem_bandwidth <= 0 \
            and self.step_overhead_s <= 0 and self.context_s_per_token <= 0

    def step_s(self, queries: Sequence[int], contexts: Sequence[int]) -> float:
        """Seconds of GPU time for one step: request i runs queries[i] new tokens over
        contexts[i] tokens of context (the new ones included)."""
        if self.infinite or not queries:
            return 0.0
        tokens = sum(queries)
        attn = sum(q * (s - (q - 1) / 2) for q, s in zip(queries, contexts, strict=True))
        flops = 2 * self.active_params * tokens + 4 * self.layers * self.attention_dim * attn
        weights = min(self.params, self.active_params * tokens) * self.bytes_per_param
        kv = self.kv_bytes_per_token * sum(contexts)
        flop_rate = self.gpus * self.peak_flops * self.flops_efficiency
        byte_rate = self.gpus * self.mem_bandwidth * self.bandwidth_efficiency
        compute = flops / flop_rate if flop_rate else 0.0
        memory = (weights + kv) / byte_rate if byte_rate else 0.0
        step = self.step_overhead_s + self.context_s_per_token * max(contexts)
        step += max(compute, memory)
        return step / self.gpu_speed

    def kv_blocks(self) -> int | None:
        """KV-cache blocks the emulated GPUs hold after the weights (None: no limit modelled)."""
        if self.memory_bytes <= 0 or self.kv_bytes_per_token <= 0:
            return None
        weights = self.params * self.bytes_per_param
        free = self.gpus * self.memory_bytes * self.memory_utilization - weights
        if free <= 0:
            raise CputaxError(f"emulated GPU {self.name}: the weights ({weights / 1e9:.0f} GB) "
                              f"do not fit in {self.gpus} x {self.memory_bytes / 1e9:.0f} GB")
        return int(free // (self.kv_bytes_per_token * self.block_size))

    def scaled(self, speed: float) -> TimingModel:
        if not speed > 0:
            raise CputaxError(f"--gpu-speed must be above 0 (inf for no GPU time), not {speed}")
        return replace(self, gpu_speed=self.gpu_speed * speed)

    def record(self) -> dict[str, Any]:
        """Every coefficient and the KV capacity: what run.json and the report header show."""
        out = asdict(self)
        out["gpu_speed"] = "inf" if math.isinf(self.gpu_speed) else self.gpu_speed
        out["kv_blocks"] = self.kv_blocks()
        out["kv_tokens"] = None if out["kv_blocks"] is None else out["kv_blocks"] * self.block_size
        out["decode_step_ms_at_1k"] = 1e3 * self.step_s([1], [1024])
        return out

    def to_env(self) -> str:
        """The model as one JSON string, for the plugin inside vLLM (no file needed there)."""
        import json

        speed = "inf" if math.isinf(self.gpu_speed) else self.gpu_speed
        return json.dumps({**asdict(self), "gpu_speed": speed})

    @classmethod
    def from_env(cls, text: str) -> TimingModel:
        import json

        fields = json.loads(text)
        fields["gpu_speed"] = float(fields["gpu_speed"])
        return cls(**fields)


def preset_names() -> list[str]:
    """The presets that come with cputax (src/cputax/emulation/presets/*.toml)."""
    folder = resources.files("cputax.emulation") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_timing(name_or_file: str, gpu_speed: float = 1.0) -> TimingModel:
    """A preset by name, or a TOML file of the same shape; scaled by `gpu_speed`."""
    path = Path(name_or_file)
    if name_or_file.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise CputaxError(f"--emulate-gpu {name_or_file}: no such file")
        text, source = path.read_text(), str(path)
    elif name_or_file in preset_names():
        folder = resources.files("cputax.emulation") / "presets"
        text = (folder / f"{name_or_file}.toml").read_text()
        source = name_or_file
    else:
        raise CputaxError(f"--emulate-gpu {name_or_file}: not a preset "
                          f"({', '.join(preset_names())}), a TOML file or {NONE}")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CputaxError(f"--emulate-gpu {source}: {exc}") from exc
    fields: dict[str, Any] = {"source": source}
    for section in ("gpu", "model"):
        part = data.pop(section, {})
        if section == "gpu" and "name" in part:
            fields["gpu"] = part.pop("name")
        if section == "model" and "name" in part:
            fields["model"] = part.pop("name")
        fields.update(part)
    fields.update(data)
    known = set(TimingModel.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CputaxError(f"--emulate-gpu {source}: unknown keys {', '.join(unknown)}")
    fields.setdefault("name", Path(source).stem)
    try:
        model = TimingModel(**fields)
    except TypeError as exc:
        raise CputaxError(f"--emulate-gpu {source}: {exc}") from exc
    if any(isinstance(v, (int, float)) and v < 0 for v in asdict(model).values()):
        raise CputaxError(f"--emulate-gpu {source}: coefficients must not be negative")
    return model.scaled(gpu_speed)
