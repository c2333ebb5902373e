"""`cputax serve-local`: an embedded target on its own, in the foreground until Ctrl-C."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from cputax.servers import get
from cputax.session import RunOptions, emulation_for
from cputax.targets.embedded import EmbeddedServer
from cputax.targets.model import model_dir

__all__ = ["serve_local"]


def serve_local(
    host: str,
    port: int,
    target: str = "transformers",
    emulate_gpu: str | None = None,
    gpu_speed: float = 1.0,
) -> int:
    table = get(target)
    emulation = emulation_for(RunOptions(emulate_gpu=emulate_gpu, gpu_speed=gpu_speed), table)
    steps = None
    if emulation is not None:
        steps = Path(tempfile.gettempdir()) / f"cputax-emulated-gpu-{port}.jsonl"
        print(
            f"cputax serve-local: emulated GPU {emulation.name} (x{emulation.gpu_speed:g}); "
            f"the CPU side is real; steps in {steps}",
            file=sys.stderr,
            flush=True,
        )
    server = EmbeddedServer(table, host=host, port=port, emulation=emulation, steps_path=steps)
    if not (model_dir() / "config.json").is_file():
        print(
            f"cputax serve-local: writing the tiny model once to {model_dir()}",
            file=sys.stderr,
            flush=True,
        )
    assert table.launch is not None
    print(
        f"cputax serve-local: starting {table.launch.description} on {host}:{port} "
        "(tiny random Llama)...",
        file=sys.stderr,
        flush=True,
    )
    with server:
        print(
            f"endpoint {server.endpoint}\nmodel    {server.model}\nlog      {server.log_path}\n"
            f"ready in {server.startup_s:.1f} s; Ctrl-C stops it",
            flush=True,
        )
        try:
            status = server.wait()
        except KeyboardInterrupt:
            print("cputax serve-local: stopping", file=sys.stderr, flush=True)
            return 0
        raise server.failure(f"exited by itself with status {status}")
