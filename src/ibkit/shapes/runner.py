"""Running the demo's ``ibkit`` commands: one after the other in this process, or independent jobs side by
side in processes of their own, timed per step, with the machine they ran on named (a time is true of one
machine)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

log = logging.getLogger(__name__)


def format_minutes(seconds: float) -> str:
    """A time as the demo writes it: "8 min 05 s", or "42 s" under a minute."""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


class StepClock:
    """Elapsed time per pipeline step, printed as each ends."""

    def __init__(self, labels: Mapping[str, str]) -> None:
        self.labels = labels
        self.started = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def done(self, step: str, label: str | None = None) -> None:
        """Record the time since the last step as ``step``'s, printed with ``label`` (default: its label)."""
        now = time.perf_counter()
        self.seconds[step] = round(now - self.last, 1)
        self.last = now
        print(f"\n[demo] {label or self.labels[step]}: {format_minutes(self.seconds[step])} "
              f"(total so far {format_minutes(now - self.started)})", flush=True)

    @property
    def total(self) -> float:
        return round(self.last - self.started, 1)


Commands = list[list[str]]  # ibkit command lines (without "ibkit"), run one after the other


def _command_line(args: list[str]) -> str:
    return "$ ibkit " + " ".join(shlex.quote(a) for a in args)


def run_commands(commands: Commands) -> None:
    """Run ibkit commands in this process, one after the other, each printed first."""
    from ibkit.app import main

    for args in commands:
        print("\n" + _command_line(args), flush=True)
        code = main(args)
        if code:
            raise SystemExit(f"ibkit {args[0]} failed with exit code {code}")


def cores() -> int:
    """The CPU cores this process may use (its affinity where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


Lane = Mapping[str, Commands]  # named steps, run one after the other in one process's lane


def run_side_by_side(jobs: Mapping[str, Commands | Lane], logs: Mapping[str, Path]) -> dict[str, float]:
    """Run independent jobs at the same time, each in its own process with an equal share of the CPU cores as
    torch threads. A job is a list of ibkit commands (one step, named by the job) or a lane: named steps, each
    a list of commands, run one after the other (a step that needs an earlier step of its lane, beside a job it
    does not need). Returns each step's wall seconds.

    Why: the demo's small models use two cores poorly (on the 2-core AMD EPYC the encoder step ran 1.25x and
    the T5 step 1.4x slower on one core than on two), so two independent steps side by side, one core each,
    finish sooner than one after the other. The thread count is fixed per job, so a seed still fixes every
    result. The first job prints here; every other job writes to its file in ``logs`` (named on failure).
    Every job runs to its end even when another fails, so that no finished step is lost (a lane stops at its
    failed step: the next one would need it).
    """
    lanes = {name: dict(job) if isinstance(job, Mapping) else {name: job} for name, job in jobs.items()}
    threads = max(1, cores() // len(lanes))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    seconds: dict[str, float] = {}
    failed: dict[str, str] = {}

    def job(name: str, lane: dict[str, Commands], log: Path | None) -> None:
        try:
            if log is not None:
                log.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.ExitStack() as stack:
                sink = stack.enter_context(open(log, "w")) if log is not None else None
                for step, commands in lane.items():
                    started = time.perf_counter()
                    for args in commands:
                        print("\n" + _command_line(args), flush=True, file=sink or sys.stdout)
                        if sink is not None:
                            sink.flush()
                        code = subprocess.call([sys.executable, "-m", "ibkit", *args], env=env, stdout=sink,
                                               stderr=subprocess.STDOUT if sink is not None else None)
                        if code:
                            where = step if step == name else f"{step} in {name}"  # lanes may share step names
                            failed[name] = f"ibkit {args[0]} of {where} failed with exit code {code}" + (
                                f" (its output: {log})" if log is not None else "")
                            return
                    seconds[step] = round(time.perf_counter() - started, 1)
        except OSError as error:
            failed[name] = f"{name} could not run: {error}"

    names = list(lanes)
    for name in names[1:]:
        print(f"[demo] {name}: running beside {names[0]} ({threads} thread(s) each); its output goes to {logs[name]}",
              flush=True)
    workers = [threading.Thread(target=job, args=(name, lanes[name], logs.get(name) if i else None))
               for i, name in enumerate(names)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if failed:
        raise SystemExit("; ".join(failed.values()))
    return seconds


def machine_description() -> str:
    """CPU model, core count and the bf16 decision: a time or a number is true of one machine."""
    import platform

    from ibkit.models.precision import fast_bf16

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {cores()} cores, fast bf16: {'yes' if fast_bf16('cpu') else 'no'}"


class WorkLedger:
    """Seconds of each finished unit of work of a resumable run, kept in a JSON file beside its results: a run
    resumed after an interruption skips the finished units, yet still reports what all of them took.

    A unit's time is added when the unit ends; one interrupted before its end adds nothing (its finished steps
    are kept, and the rerun times what is left). An unreadable file loses only the times: a fresh ledger,
    with a warning that names the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seconds: dict[str, float] = {}
        if path.exists():
            try:
                loaded = json.loads(path.read_text())
                if not isinstance(loaded, dict) or not all(isinstance(v, (int, float)) for v in loaded.values()):
                    raise ValueError("not an object of seconds per unit")
                self.seconds = {str(unit): float(value) for unit, value in loaded.items()}
            except (OSError, ValueError) as error:
                log.warning("%s: cannot read the earlier units' times (%s); counting from this run on", path, error)

    @contextlib.contextmanager
    def timing(self, unit: str) -> Iterator[None]:
        """Time the block as ``unit`` (added to its earlier time, if any), saved as soon as it ends."""
        started = time.perf_counter()
        yield
        self.seconds[unit] = round(self.seconds.get(unit, 0.0) + time.perf_counter() - started, 1)
        scratch = self.path.with_name(self.path.name + ".tmp")  # written whole, then renamed: never half a file
        scratch.write_text(json.dumps(self.seconds, indent=2, sort_keys=True))
        scratch.replace(self.path)

    @property
    def total(self) -> float:
        return round(sum(self.seconds.values()), 1)
