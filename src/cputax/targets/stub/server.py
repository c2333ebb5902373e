"""The stub's process lifecycle: serve in the foreground (`cputax stub`), or for the length
of a `with` block in a thread or a child process (StubServer)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import re
import select
import subprocess
import sys
import threading

import orjson
from aiohttp import web

from cputax.errors import CputaxError
from cputax.targets.stub.app import StubApp
from cputax.targets.stub.config import StubConfig

__all__ = ["StubServer", "child_main", "serve_stub"]


async def _start(config: StubConfig, host: str, port: int) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(StubApp(config).app(), access_log=None, handle_signals=False)
    await runner.setup()
    # A deep backlog: 256 clients connecting at once must not wait for SYN retries.
    site = web.TCPSite(runner, host, port, backlog=4096)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise CputaxError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    bound_host, bound_port = runner.addresses[0][:2]
    return runner, f"http://{bound_host}:{bound_port}"


def _describe(config: StubConfig) -> str:
    return (
        f"headers {config.headers_delay_ms:g} ms, first token +{config.first_token_delay_ms:g} ms, "
        f"every {config.inter_token_delay_ms:g} ms, {config.output_tokens} tokens, "
        f"model {config.model}"
    )


def serve_stub(host: str, port: int, config: StubConfig) -> int:
    """Serve in the foreground until Ctrl-C; the first stdout line carries the URL (StubServer
    reads it)."""

    async def main() -> None:
        runner, url = await _start(config, host, port)
        # the heap of imports and set-up out of the collector's walks, as the client's
        # (client.heap): a full collection between a token's stamp and its write would
        # put the collector's pause into the truth
        gc.collect()
        gc.freeze()
        print(f"cputax stub: serving on {url} ({_describe(config)})", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


class StubServer:
    """Run the stub on host:port (0 = a free port) for the length of a `with` block; `.url`
    is its base URL.

    process=False (tests): a background thread with its own event loop, cheap to
    start, but it shares the GIL with the client. process=True (calibration): a
    child process (`python -m cputax.targets.stub CONFIG_JSON`), so the stub's
    Python work does not queue behind the client's; it still shares the CPUs.
    """

    def __init__(
        self,
        config: StubConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        process: bool = False,
        start_timeout_s: float = 60.0,
    ):
        self.config = config or StubConfig()
        self.host = host
        self.port = port
        self.process = process
        self.start_timeout_s = start_timeout_s
        self.url = ""
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._child: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> StubServer:
        if self.process:
            self._start_process()
        else:
            self._start_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._child is not None:
            self._child.terminate()
            try:
                self._child.wait(10)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()
            self._child = None
        if self._thread is not None:
            assert self._loop is not None and self._stop is not None
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join()
            self._thread = None

    def _start_thread(self) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                runner, self.url = await _start(self.config, self.host, self.port)
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            try:
                await self._stop.wait()
            finally:
                await runner.cleanup()

        self._thread = threading.Thread(
            target=asyncio.run, args=(main(),), name="cputax-stub", daemon=True
        )
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]

    def _start_process(self) -> None:
        config = orjson.dumps(
            {**dataclasses.asdict(self.config), "host": self.host, "port": self.port}
        )
        self._child = subprocess.Popen(
            [sys.executable, "-m", "cputax.targets.stub", config.decode()], stdout=subprocess.PIPE
        )
        assert self._child.stdout is not None
        ready, _, _ = select.select([self._child.stdout], [], [], self.start_timeout_s)
        line = self._child.stdout.readline().decode() if ready else ""
        found = re.search(r"http://\S+", line)
        if not found:
            code = self._child.wait(5) if not line else self._child.poll()  # EOF: it is exiting
            self.__exit__()
            why = (
                f"exited with code {code} (its error is above)"
                if code is not None
                else f"printed no URL within {self.start_timeout_s:g} s (got {line.strip()!r})"
            )
            raise CputaxError(f"the stub process {why}")
        self.url = found.group(0)


def child_main(settings_json: str) -> int:
    """Entry point of StubServer(process=True): the settings come as one JSON argument."""
    settings = orjson.loads(settings_json)
    try:
        return serve_stub(settings.pop("host"), settings.pop("port"), StubConfig(**settings))
    except CputaxError as exc:
        print(f"cputax stub: error: {exc}", file=sys.stderr)
        return 2
