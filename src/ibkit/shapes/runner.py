"""Running the demo's ``ibkit`` commands: one after the other in this process, or independent jobs side by
side in processes of their own, timed per step, with the machine they ran on named (a time is true of one
machine)."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import multiprocessing.connection
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


# What an ``ibkit`` command imports before it runs (torch, Lightning, jsonargparse, transformers' T5, ibkit's
# models, data and training): 5.7 s a process on the 2-core AMD EPYC, paid by every command of a lane.
COMMAND_MODULES = (
    "ibkit.app", "ibkit.app.config", "ibkit.app.export", "ibkit.training.module", "ibkit.training.text_lm",
    "ibkit.training.encoder_pretrain", "ibkit.training.pretrain", "ibkit.training.callbacks", "ibkit.shapes.datamodule",
    "ibkit.shapes.runner", "ibkit.eval.evaluator", "transformers.models.t5.modeling_t5", "peft",
)
HAS_FORKSERVER = "forkserver" in multiprocessing.get_all_start_methods()  # not on Windows


def command_processes() -> multiprocessing.context.BaseContext:
    """Where side-by-side commands run: processes forked from a server that has imported
    :data:`COMMAND_MODULES` once (multiprocessing's forkserver), so that a command starts in a fraction of a
    second instead of importing them again. The server has run nothing, so a fork of it is as fresh as a new
    interpreter (no thread pools yet); each command sets its own environment and thread count.

    Calling it early (the demo does, before rendering its data) lets the server import while this process works.
    As with any use of multiprocessing, a script that calls the demo from Python guards its entry point with
    ``if __name__ == "__main__":`` (a forked command prepares the script's module as a new interpreter would)."""
    if not HAS_FORKSERVER:
        return multiprocessing.get_context()
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(COMMAND_MODULES))
    from multiprocessing import forkserver

    forkserver.ensure_running()
    return context


def _command_child(args: list[str], env: dict[str, str], threads: int, log: str | None) -> None:
    """One ``ibkit`` command in a forked process: the environment and thread count of ``python -m ibkit`` run
    with ``env``, its output appended to ``log`` (else this process's own)."""
    if log is not None:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = ["ibkit", *args]
    # what a new interpreter would start its data-loader workers with (a forkserver's child otherwise starts them
    # through a server of its own, which imports everything again: 34 s of a 39 s evaluation at the test size)
    multiprocessing.set_start_method("fork" if sys.platform.startswith("linux") else "spawn", force=True)
    import torch

    torch.set_num_threads(threads)
    from ibkit.app import main

    code = main(args)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def run_command_process(args: list[str], env: dict[str, str], threads: int, log: Path | None = None) -> int:
    """Run one ``ibkit`` command in a process of its own (:func:`command_processes`; a new interpreter where
    there is no forkserver, as on Windows); its exit code."""
    if not HAS_FORKSERVER:
        with open(log, "a") if log is not None else contextlib.nullcontext() as sink:
            return subprocess.call([sys.executable, "-m", "ibkit", *args], env=env, stdout=sink,
                                   stderr=subprocess.STDOUT if sink is not None else None)
    target_args = (args, env, threads, None if log is None else str(log))
    return run_process(command_processes().Process(target=_command_child, args=target_args))


# Held while a process starts and while its exit code is read: ``Process.start`` first polls every unfinished
# process this one started (multiprocessing's ``_cleanup``), and a forkserver process's poll reads its exit code
# from a pipe, once. A lane's thread polling the other lane's process just as that thread reads the same exit code
# leaves one of them with nothing to read, which multiprocessing reports as exit code 255 (2-core AMD EPYC: 23 of
# 600 short processes started two threads at a time; none of 6,000 with the lock).
_PROCESS_LOCK = threading.Lock()


def run_process(process: multiprocessing.process.BaseProcess) -> int:
    """Start ``process``, wait for it and return its exit code (1 where it has none), safely beside other
    threads doing the same: the wait itself is outside :data:`_PROCESS_LOCK`, so lanes still run side by side."""
    with _PROCESS_LOCK:
        process.start()
    multiprocessing.connection.wait([process.sentinel])
    with _PROCESS_LOCK:
        process.join()
    return process.exitcode if process.exitcode is not None else 1


def cores() -> int:
    """The CPU cores this process may use (its affinity where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


Lane = Mapping[str, Commands]  # named steps, run one after the other in one process's lane


def run_side_by_side(jobs: Mapping[str, Commands | Lane], logs: Mapping[str, Path],
                     after: Mapping[str, str] | None = None) -> dict[str, float]:
    """Run independent jobs at the same time, each in its own process with an equal share of the CPU cores as
    torch threads. A job is a list of ibkit commands (one step, named by the job) or a lane: named steps, each
    a list of commands, run one after the other (a step that needs an earlier step of its lane, beside a job it
    does not need). Returns each step's wall seconds.

    Each command runs in a process of its own, forked from a server that has imported what a command needs
    (:func:`command_processes`): the same command, environment and thread count as ``python -m ibkit`` in a
    new interpreter, the same results, without importing torch, Lightning and transformers again per command.

    Why: the demo's small models use two cores poorly (on the 2-core AMD EPYC the encoder step ran 1.25x and
    the T5 step 1.4x slower on one core than on two), so two independent steps side by side, one core each,
    finish sooner than one after the other. The thread count is fixed per job, so a seed still fixes every
    result. The first job prints here; every other job writes to its file in ``logs`` (named on failure).
    Every job runs to its end even when another fails, so that no finished step is lost (a lane stops at its
    failed step: the next one would need it).

    ``after`` maps a step to a step of another lane that must end first: the step waits for it, and does not run
    (its lane stops there) if that one failed. Waits that could never end (a cycle through the lanes' orders)
    are refused before anything runs.
    """
    lanes = {name: dict(job) if isinstance(job, Mapping) else {name: job} for name, job in jobs.items()}
    after = dict(after or {})
    _check_waits(lanes, after)
    ended = {step: threading.Event() for lane in lanes.values() for step in lane}
    threads = max(1, cores() // len(lanes))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    seconds: dict[str, float] = {}
    failed: dict[str, str] = {}

    def job(name: str, lane: dict[str, Commands], log: Path | None) -> None:
        try:
            if log is not None:
                log.parent.mkdir(parents=True, exist_ok=True)
                log.write_text("")
            with contextlib.ExitStack() as stack:
                # appended to, by this thread and by each command's process in turn
                sink = stack.enter_context(open(log, "a")) if log is not None else None
                for step, commands in lane.items():
                    if step in after:
                        ended[after[step]].wait()
                        if after[step] not in seconds:
                            failed[name] = f"{step} in {name} did not run: it needs {after[step]}, which failed"
                            return
                    started = time.perf_counter()
                    for args in commands:
                        print("\n" + _command_line(args), flush=True, file=sink or sys.stdout)
                        if sink is not None:
                            sink.flush()
                        code = run_command_process(args, env, threads, log)
                        if code:
                            where = step if step == name else f"{step} in {name}"  # lanes may share step names
                            failed[name] = f"ibkit {args[0]} of {where} failed with exit code {code}" + (
                                f" (its output: {log})" if log is not None else "")
                            return
                    seconds[step] = round(time.perf_counter() - started, 1)
                    ended[step].set()
        except OSError as error:
            failed[name] = f"{name} could not run: {error}"
        finally:
            for step in lane:  # a failed or skipped step has ended too: whoever waits for it learns so
                ended[step].set()

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


def _check_waits(lanes: Mapping[str, Mapping[str, Commands]], after: Mapping[str, str]) -> None:
    """Refuse ``after`` entries that name no step, stay within one lane, or close a cycle of waits (each step
    also waits for the one before it in its lane), which would leave the lanes waiting for each other."""
    lane_of = {step: name for name, lane in lanes.items() for step in lane}
    for step, needed in after.items():
        for named in (step, needed):
            if named not in lane_of:
                raise ValueError(f"after: no step {named!r}; the steps are {sorted(lane_of)}")
            if sum(named in lane for lane in lanes.values()) > 1:
                raise ValueError(f"after: more than one lane has a step {named!r}")
        if lane_of[step] == lane_of[needed]:
            raise ValueError(f"after: {step!r} and {needed!r} are both in lane {lane_of[step]!r}, which runs its "
                             "steps in order already")
    waits_for = {step: [after[step]] if step in after else [] for step in lane_of}
    for lane in lanes.values():
        steps = list(lane)
        for earlier, later in zip(steps, steps[1:]):
            waits_for[later].append(earlier)
    done: set[str] = set()

    def visit(step: str, path: tuple[str, ...]) -> None:
        if step in path:
            cycle = " -> ".join((*path[path.index(step):], step))
            raise ValueError(f"after: these steps would wait for each other forever: {cycle}")
        if step not in done:
            for needed in waits_for[step]:
                visit(needed, (*path, step))
            done.add(step)

    for step in waits_for:
        visit(step, ())


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
