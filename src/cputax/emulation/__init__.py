"""cputax's vLLM plugin: an emulated GPU inside the real vLLM (and, later, component
slowdowns beside it).

    timing   the timing model (a roofline with coefficients from TOML presets)
    steps    the step records the emulated GPU appends to emulated-gpu.jsonl
    plugin   the `vllm.general_plugins` entry point: inert unless cputax asked
    model    the emulated architecture vLLM serves (imports torch and vLLM)

Imported by vLLM in its own processes, and by cputax's starting side for presets and
step records; it never imports the measuring side.
"""

from cputax.emulation.steps import StepRecord, read_steps
from cputax.emulation.timing import NONE, TimingModel, load_timing, preset_names

__all__ = ["NONE", "StepRecord", "TimingModel", "load_timing", "preset_names", "read_steps"]
