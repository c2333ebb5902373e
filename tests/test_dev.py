"""dev.py, the set-up behind the two commands: its order, its stamps, its failures.

pip and apt-get are replaced by a recorder (a real install takes minutes and the
registries); the virtualenv step is also run for real once.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("cputax_dev_script", ROOT / "dev.py")
dev = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = dev  # dataclasses look their module up there
spec.loader.exec_module(dev)


class Recorder:
    """Stands in for pip and apt-get: records each command, makes what a success leaves
    behind (a venv's python, a peer's executable), fails where told to."""

    def __init__(self, fail: str | None = None):
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, cmd: Sequence[str]) -> int:
        cmd = [str(c) for c in cmd]
        self.calls.append(cmd)
        if self.fail and any(self.fail in c for c in cmd):
            return 3
        if cmd[1:3] == ["-m", "venv"]:
            (Path(cmd[3]) / "bin").mkdir(parents=True)
            (Path(cmd[3]) / "bin" / "python").touch()
        elif "install" in cmd and "-e" not in cmd and cmd[0].endswith("/bin/python"):
            venv = Path(cmd[0]).parent.parent
            for peer in dev.PEERS:
                if venv.name == peer.name:
                    (venv / "bin" / peer.name).touch()
        return 0

    def pip(self) -> list[list[str]]:
        return [c[c.index("pip") + 1 :] for c in self.calls if "pip" in c]


def setup(tmp_path: Path, recorder: Recorder) -> dev.Setup:
    pyproject = tmp_path / "pyproject.toml"
    if not pyproject.exists():
        pyproject.write_text('[project]\nname = "x"\n')
    return dev.Setup(
        venv=tmp_path / "venv", peers_dir=tmp_path / "peers", run=recorder, pyproject=pyproject
    )


def test_first_call_installs_torch_first_then_the_extras_then_uninstalls(tmp_path):
    rec = Recorder()
    setup(tmp_path, rec).project()
    assert rec.calls[0][1:] == ["-m", "venv", str(tmp_path / "venv")]
    assert rec.pip() == [
        ["install", "-q", "--upgrade", "pip"],
        ["install", "-q", "torch==2.13.0"],
        ["install", "-q", "-e", ".[local,test,ray]"],
        ["uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
    ]
    assert all(c[0] == str(tmp_path / "venv" / "bin" / "python") for c in rec.calls[1:])


def test_a_second_call_does_nothing_and_a_changed_pyproject_reinstalls(tmp_path):
    setup(tmp_path, Recorder()).project()
    again = Recorder()
    setup(tmp_path, again).project()
    assert again.calls == []
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "2"\n')
    changed = Recorder()
    setup(tmp_path, changed).project()
    assert len(changed.pip()) == 4 and not any("venv" in c for c in changed.calls)  # venv kept


def test_a_failed_step_stops_and_leaves_no_stamp(tmp_path):
    with pytest.raises(dev.SetupError, match=r"installing torch==2.13.0 failed \(exit 3\)"):
        setup(tmp_path, Recorder(fail="torch==")).project()
    assert not (tmp_path / "venv" / dev.STAMP).exists()
    retry = Recorder()
    setup(tmp_path, retry).project()  # the next call starts that step again
    assert len(retry.pip()) == 4


def test_peers_each_in_its_venv_a_failure_only_skips_that_peer(tmp_path, capsys):
    rec = Recorder(fail="aiperf==")
    s = setup(tmp_path, rec)
    for peer in dev.PEERS:
        s.peer(peer)
    out = capsys.readouterr().out
    assert "could not install aiperf" in out and "its peer test will be skipped" in out
    guidellm = tmp_path / "peers" / "guidellm" / "bin" / "guidellm"
    assert s.env == {"CPUTAX_GUIDELLM": str(guidellm)}
    assert [c for c in rec.pip() if "guidellm==0.8.1" in c] == [
        ["install", "-q", "torch==2.13.0", "guidellm==0.8.1"]
    ]  # the CPU torch, pinned
    again = Recorder()
    s2 = setup(tmp_path, again)
    for peer in dev.PEERS:
        s2.peer(peer)
    assert [c for c in again.calls if "guidellm==0.8.1" in c] == []  # stamped: not again
    assert any("aiperf==0.13.0" in c for c in again.calls)  # the failed one is tried again
    assert set(s2.env) == {"CPUTAX_AIPERF", "CPUTAX_GUIDELLM"}


def test_chromium_is_installed_as_root_with_apt_get_else_said(tmp_path, capsys, monkeypatch):
    apt = "/usr/bin/apt-get"
    monkeypatch.setattr(dev.shutil, "which", lambda name: apt if name == "apt-get" else None)
    monkeypatch.setattr(dev.os, "geteuid", lambda: 1000)
    rec = Recorder()
    setup(tmp_path, rec).chromium()
    assert rec.calls == []
    assert "needs root and apt-get: the browser test will be skipped" in capsys.readouterr().out
    monkeypatch.setattr(dev.os, "geteuid", lambda: 0)
    setup(tmp_path, rec).chromium()
    assert rec.calls == [
        ["apt-get", "update", "-qq"],
        ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-qq", "chromium"],
    ]
    setup(tmp_path, Recorder(fail="install")).chromium()  # no network, no package: go on
    assert "could not install chromium: the browser test will be skipped" in capsys.readouterr().out


def test_main_sets_up_then_replaces_itself_with_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dev.Setup, "pyproject", tmp_path / "pyproject.toml")
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    monkeypatch.setattr(dev.shutil, "which", lambda name: "/usr/bin/chromium")
    ran = []
    args = ["--venv", str(tmp_path / "v"), "--peers", str(tmp_path / "p")]
    assert (
        dev.main(
            [*args, "test", "-q", "-rs"],
            runner=Recorder(),
            execute=lambda exe, argv, env: ran.append((argv, env)),
        )
        == 0
    )
    ((argv, env),) = ran
    assert argv == [str(tmp_path / "v" / "bin" / "python"), "-m", "pytest", "-q", "-rs"]
    assert env["CPUTAX_AIPERF"] == str(tmp_path / "p" / "aiperf" / "bin" / "aiperf")
    assert env["PATH"].split(":")[0] == str(tmp_path / "v" / "bin")  # as if activated
    assert env["VIRTUAL_ENV"] == str(tmp_path / "v")
    assert (
        dev.main(
            [*args, "run", "--profile", "x.toml"],
            runner=Recorder(),
            execute=lambda exe, argv, env: ran.append((argv, env)),
        )
        == 0
    )
    assert ran[1][0][1:] == ["-m", "cputax", "run", "--profile", "x.toml"]
    out = capsys.readouterr().out
    assert "installed (.cputax-dev-stamp matches pyproject.toml)" in out  # the second call


def test_bad_usage_is_one_line_and_exit_1(capsys):
    assert dev.main(["bench"], runner=Recorder(), execute=lambda *a: None) == 1
    assert dev.main(["--venv"], runner=Recorder(), execute=lambda *a: None) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [dev.USAGE.join(["dev.py: ", ""]), "dev.py: --venv needs a directory"]


def test_the_venv_step_for_real(tmp_path):
    s = dev.Setup(venv=tmp_path / "venv", peers_dir=tmp_path / "peers")
    assert s.make_venv(s.venv) is True
    out = subprocess.run(
        [str(s.python()), "-c", "import sys; print(sys.prefix)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(out) == s.venv
    assert s.make_venv(s.venv) is False  # there: not made again


def test_the_script_runs_with_the_system_python_alone(tmp_path):
    """Standard library only: `python3 dev.py` works before anything is installed."""
    proc = subprocess.run(
        [sys.executable, "-I", "-S", str(ROOT / "dev.py"), "nothing"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and proc.stderr.startswith("dev.py: usage:")
