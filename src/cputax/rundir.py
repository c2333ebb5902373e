"""The one owner of a run directory's layout, and of run.json's read-modify-write.

A run directory is a complete, shareable record of one run (no secrets):

    run.json            what was asked, where, the server's flags; monitors' metadata
    requests.jsonl      one line per finished request, flushed as it finishes
    windows.jsonl       when each scenario's measured part ran
    metrics/            Prometheus text before and after each scenario, gauge polls
    telemetry.jsonl     host and GPU samples on the run's clock
    spans.jsonl         the server's per-request spans (OTLP), joined to requests by analysis
    pyspy/              py-spy per server process and window (pyspy/manifest.jsonl)
    server.log          the embedded server's output
    summary.json, correlation.json, pyspy/attribution.json   derived (analysis)
    report.md, report.html, plots/                           rendered (report)

Every other module asks a RunDir for a path; none spells a file name. As pyperf's
BenchmarkSuite owns its JSON, RunDir owns this layout (the formats inside the files
belong to the modules that write them).

run.json carries its own `format_version` and a `formats` map: the format version of each
raw file written beside it (RAW_FORMATS). A run.json without them is version 1 (runs
written before versions existed). Reading run.json refuses, in one line, a version this
cputax does not know, rather than misread a run written by another cputax.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cputax.errors import CputaxError
from cputax.records import (
    RequestRecord,
    RequestTable,
    read_json,
    read_jsonl,
    read_request_table,
    read_requests,
    write_json,
)
from cputax.results.summary import Summary
from cputax.results.sweep import Sweep

__all__ = ["RAW_FORMATS", "RUN_FORMAT", "RunDir", "SweepDir", "WhatIfDir", "safe_name"]

RUN_FORMAT = 1  # run.json's own format_version
# The format version of each raw file (or folder of them) a run writes beside run.json:
# bump one when its format changes so that an older reader would misread it. server.log is
# the server's own output, in no format of cputax's. Derived files carry their own version
# (cputax.results).
RAW_FORMATS: dict[str, int] = {
    "requests.jsonl": 1,
    "windows.jsonl": 1,
    "metrics/": 1,
    "telemetry.jsonl": 1,
    "spans.jsonl": 1,
    "emulated-gpu.jsonl": 1,
    "pyspy/": 1,
    "nodes/": 1,
}


def safe_name(name: str) -> str:
    """A scenario or role name as a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


class RunDir:
    """Paths of one run (or profile) directory, and run.json."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # --- making one ------------------------------------------------------------------------
    @classmethod
    def create(
        cls, out: Path | None, default_parent: Path = Path("runs"), prefix: str = ""
    ) -> RunDir:
        """A new run directory (default runs/<prefix><time>); refuses one that holds a run."""
        run = cls(out or default_parent / f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}")
        if run.requests.exists() or run.pyspy_manifest.exists():
            raise CputaxError(
                f"{run.path} already holds a run; choose another --out (nothing was overwritten)"
            )
        run.metrics.mkdir(parents=True, exist_ok=True)
        return run

    @classmethod
    def existing(cls, path: Path | str) -> RunDir:
        """An existing run (or profile) directory; its run.json, if any, in a format this
        cputax reads (CputaxError otherwise)."""
        run = cls(path)
        if not run.path.is_dir():
            raise CputaxError(f"{run.path}: no such run directory")
        if run.has_info():
            run.info()
        return run

    # --- what the run records --------------------------------------------------------------
    @property
    def info_path(self) -> Path:
        return self.path / "run.json"

    @property
    def requests(self) -> Path:
        return self.path / "requests.jsonl"

    @property
    def windows(self) -> Path:
        return self.path / "windows.jsonl"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics"

    def scrape(self, scenario: str, when: str) -> Path:
        """Prometheus text scraped before or after a scenario (`when`: "before", "after")."""
        return self.metrics / f"{scenario}.{when}.prom"

    def gauges(self, scenario: str) -> Path:
        return self.metrics / f"{scenario}.gauges.jsonl"

    @property
    def telemetry(self) -> Path:
        return self.path / "telemetry.jsonl"

    @property
    def spans(self) -> Path:
        """The server's per-request spans as the OTLP receiver got them (client.otlp)."""
        return self.path / "spans.jsonl"

    @property
    def server_log(self) -> Path:
        return self.path / "server.log"

    @property
    def emulated_gpu(self) -> Path:
        """The emulated GPU's steps (cputax.emulation), written by the plugin inside vLLM."""
        return self.path / "emulated-gpu.jsonl"

    @property
    def pyspy(self) -> Path:
        return self.path / "pyspy"

    @property
    def pyspy_manifest(self) -> Path:
        return self.pyspy / "manifest.jsonl"

    @property
    def profile_info(self) -> Path:
        """`cputax profile`'s own record (a profile directory has no run.json)."""
        return self.pyspy / "profile.json"

    def pyspy_stem(self, window: str, role: str, pid: int) -> Path:
        """pyspy/<window>/<role>-<pid>, relative to the run directory: the files of one sampler."""
        return Path("pyspy") / safe_name(window) / f"{safe_name(role)}-{pid}"

    # --- what analysis derives and report renders -----------------------------------------
    def node_dir(self, node: str) -> Path:
        """nodes/<node>/: a server node's files (a Ray run's node agent), in a run directory's
        layout."""
        return self.path / "nodes" / safe_name(node)

    def nodes(self) -> list[RunDir]:
        """The node folders of a Ray run, each read as a run directory of its own."""
        folder = self.path / "nodes"
        return (
            [RunDir(p) for p in sorted(folder.iterdir()) if p.is_dir()] if folder.is_dir() else []
        )

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def attribution(self) -> Path:
        return self.pyspy / "attribution.json"

    @property
    def correlation(self) -> Path:
        return self.path / "correlation.json"

    @property
    def report_md(self) -> Path:
        return self.path / "report.md"

    @property
    def report_html(self) -> Path:
        return self.path / "report.html"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def extrapolation(self, suffix: str) -> Path:
        return self.path / f"extrapolation.{suffix}"

    def views(self) -> list[Path]:
        """Profiles a run holds (flamegraphs, speedscope files), relative to the run directory."""
        patterns = ("*.svg", "*speedscope*.json", "*flamegraph*.html")
        found = {
            p
            for pattern in patterns
            for p in self.path.rglob(pattern)
            if "plots" not in p.relative_to(self.path).parts
        }
        return sorted(p.relative_to(self.path) for p in found)

    # --- run.json: written once, then updated in one place ----------------------------------
    def has_info(self) -> bool:
        return self.info_path.exists()

    def info(self) -> dict[str, Any]:
        """run.json, once its format versions are known ones (CputaxError otherwise)."""
        info = read_json(self.info_path)
        _check_formats(self.info_path, info)
        return info

    def write_info(self, info: dict[str, Any]) -> None:
        """Write run.json whole, stamped with its format version and its files'."""
        write_json(
            self.info_path, {"format_version": RUN_FORMAT, "formats": dict(RAW_FORMATS), **info}
        )

    def update_info(self, **changes: Any) -> dict[str, Any]:
        """Merge top-level keys into run.json (read, merge, write atomically); the new content."""
        info = {**self.info(), **changes}
        write_json(self.info_path, info)
        return info

    # --- reading the records ----------------------------------------------------------------
    def read_requests(self) -> list[RequestRecord]:
        return read_requests(self.requests) if self.requests.exists() else []

    def read_request_table(self) -> RequestTable:
        """requests.jsonl as columns (what analysis reads: fast and small at a million requests)."""
        return read_request_table(self.requests)

    def read_windows(self) -> list[dict[str, Any]]:
        return list(read_jsonl(self.windows)) if self.windows.exists() else []

    def read_manifest(self) -> list[dict[str, Any]]:
        return list(read_jsonl(self.pyspy_manifest)) if self.pyspy_manifest.exists() else []

    def read_gauges(self, scenario: str) -> list[dict[str, Any]]:
        path = self.gauges(scenario)
        return list(read_jsonl(path)) if path.exists() else []

    def read_scrape(self, scenario: str, when: str) -> str | None:
        path = self.scrape(scenario, when)
        return path.read_text() if path.exists() else None

    def iter_telemetry(self) -> Iterator[dict[str, Any]]:
        return read_jsonl(self.telemetry) if self.telemetry.exists() else iter(())

    def read_optional(self, path: Path) -> Any:
        """A JSON file of this directory, or None when it is not there."""
        return read_json(path) if path.exists() else None

    def write(self, path: Path, obj: Any) -> None:
        write_json(path, obj)

    def read_summary(self) -> Summary:
        """summary.json as a Summary; one CputaxError line for a missing file or a format
        version this cputax does not read."""
        return Summary.load(self.summary)

    def write_summary(self, summary: Summary) -> None:
        summary.dump(self.summary)


def _check_formats(path: Path, info: Any) -> None:
    """Refuse, in one line, a run.json (or a raw file it names) in a format version this
    cputax does not know. Absent versions are 1; a file this cputax does not know of is
    not its to read, so its version is not checked."""
    if not isinstance(info, dict):
        raise CputaxError(f"{path}: not a run.json (a JSON object)")
    wrote = f" (written by cputax {info['cputax_version']})" if info.get("cputax_version") else ""
    found = [("run.json", info.get("format_version", 1), RUN_FORMAT)]
    formats = info.get("formats") or {}
    if not isinstance(formats, dict):
        raise CputaxError(f"{path}: `formats` is not a map of file to format version")
    found += [
        (name, version, RAW_FORMATS[name])
        for name, version in formats.items()
        if name in RAW_FORMATS
    ]
    for name, version, known in found:
        if version != known:
            raise CputaxError(
                f"{path}: {name} format version {version!r}{wrote}; this cputax "
                f"reads version {known}: read this run with the cputax that wrote it"
            )


class SweepDir:
    """A sweep: one run directory per configuration (and repeat), plus the comparison.

    sweep.json            the plan, each step's outcome, then the comparison (analysis)
    <configuration>/      a run directory (RunDir); <configuration>-r1/ ... for repeats
    sweep.md, sweep.html, plots/   rendered (report)
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    @classmethod
    def create(cls, out: Path | None) -> SweepDir:
        sweep = cls(out or Path("runs") / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}")
        if sweep.info_path.exists():
            raise CputaxError(
                f"{sweep.path} already holds a sweep; choose another --out "
                "(nothing was overwritten)"
            )
        sweep.path.mkdir(parents=True, exist_ok=True)
        return sweep

    @classmethod
    def existing(cls, path: Path | str) -> SweepDir:
        sweep = cls(path)
        if not sweep.info_path.exists():
            raise CputaxError(f"{sweep.path}: no sweep.json; is it a sweep directory?")
        return sweep

    @property
    def info_path(self) -> Path:
        return self.path / "sweep.json"

    @property
    def report_md(self) -> Path:
        return self.path / "sweep.md"

    @property
    def report_html(self) -> Path:
        return self.path / "sweep.html"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def run(self, folder: str) -> RunDir:
        return RunDir(self.path / folder)

    def info(self) -> Sweep:
        """sweep.json (results.sweep); one CputaxError line for a version this cputax does
        not read."""
        return Sweep.load(self.info_path)

    def write_info(self, info: Sweep) -> None:
        info.dump(self.info_path)


class WhatIfDir:
    """A what-if experiment: one run directory per point (component, slowdown, repeat).

    plan.json             the plan and each point's outcome, as it happens
    slowdown/             the plugin's control file and each server process's totals
    <point>/              a run directory (RunDir) against the one server
    whatif.json           the fits and judgments (cputax.results.whatif.WhatIf)
    whatif.md, whatif.html  rendered (report)
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    @classmethod
    def create(cls, out: Path | None) -> WhatIfDir:
        exp = cls(out or Path("runs") / f"whatif-{time.strftime('%Y%m%d-%H%M%S')}")
        if exp.plan.exists():
            raise CputaxError(
                f"{exp.path} already holds a what-if experiment; choose another "
                "--out (nothing was overwritten)"
            )
        exp.path.mkdir(parents=True, exist_ok=True)
        return exp

    @classmethod
    def existing(cls, path: Path | str) -> WhatIfDir:
        exp = cls(path)
        if not exp.plan.exists():
            raise CputaxError(f"{exp.path}: no plan.json; is it a what-if directory?")
        return exp

    @property
    def plan(self) -> Path:
        return self.path / "plan.json"

    @property
    def slowdown(self) -> Path:
        return self.path / "slowdown"

    @property
    def server_log(self) -> Path:
        return self.path / "server.log"

    @property
    def result(self) -> Path:
        return self.path / "whatif.json"

    @property
    def report_md(self) -> Path:
        return self.path / "whatif.md"

    @property
    def report_html(self) -> Path:
        return self.path / "whatif.html"

    def run(self, folder: str) -> RunDir:
        return RunDir(self.path / folder)

    def read_plan(self) -> dict[str, Any]:
        return read_json(self.plan)

    def write_plan(self, plan: dict[str, Any]) -> None:
        write_json(self.plan, plan)
