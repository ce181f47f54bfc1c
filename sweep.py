"""Fan one script's configurations out as jobs (processes on this machine or one SLURM array); build its table.

    python sweep.py [sweep options] SCRIPT [script flags...]
    python sweep.py --grid lam=1,3,5,10 --grid strategy=fixed,adaptive --executor slurm --partition gpu \\
        --gpus-per-job 1 --time 720 adaptive_wgan.py --dataset cifar10
    python sweep.py --grid alpha-ds=0.5,0.6,0.7,0.8,0.9,1.0 --seed-chunks 200:50 alpha_dual_gan.py \
        --preset ring-saturating
    python sweep.py --status runs/sweeps/NAME       # the state of every job
    python sweep.py --report runs/sweeps/NAME       # the script's table from the runs finished so far

Sweep options come before the script; everything after it goes to every job unchanged. `--grid NAME=V1,V2`
(repeatable) expands to the Cartesian product; `--seed-chunks N:K` splits N stacked seeds into jobs of K (job i:
--seed first+i·K --num-seeds K). Every job is a plain run of the script into runs/sweeps/NAME/runs/JOB/, and the
table is the script's own summarize() over those runs' results.json files, so it is the in-process table.
runs/sweeps/NAME/manifest.jsonl holds one line per job (flags, run folder, state, exit code). Running the same
command again skips finished and diverged jobs and continues the others: with --resume when their run folder holds
a checkpoint, otherwise from scratch in a fresh folder. See docs/sweeps.md.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import importlib.util
import io
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import typing
from pathlib import Path

STATES = ("pending", "running", "finished", "diverged", "failed", "interrupted")
DONE = ("finished", "diverged")  # never run again: a diverged run (exit code 3) is a result
OWNED = ("run_name", "output_dir", "resume")  # set by the sweep for every job
SLURM_OPTIONS = ("partition", "gpus_per_job", "cpus_per_job", "mem_gb", "array_parallelism", "slurm_extra")


# ---------------------------------------------------------------- the script: its flags, its parser, its table

def load_script(path: str | Path):
    """Import a script as a module (a script runs nothing at import); its folder goes on sys.path for `common`."""
    path = Path(path).resolve()
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = sys.modules[path.stem] = importlib.util.module_from_spec(spec)  # dataclasses look it up by name
    spec.loader.exec_module(module)
    missing = [name for name in ("Args", "parse_args", "summarize") if not hasattr(module, name)]
    if missing:
        raise SystemExit(f"error: {path.name} has no {', '.join(missing)}: it does not follow the house contract")
    return module


def script_flags(module) -> dict[str, tuple[str, type]]:
    """Every flag of Args, underscored, aliases included → (field, type). tyro.conf.Suppress fields are not flags."""
    hints, flags = typing.get_type_hints(module.Args, include_extras=True), {}
    for field in dataclasses.fields(module.Args):
        hint, meta = hints[field.name], []
        if typing.get_origin(hint) is typing.Annotated:
            hint, *meta = typing.get_args(hint)
        if not any("Suppress" in repr(m) for m in meta):
            for name in [field.name, *(a for m in meta for a in (getattr(m, "aliases", None) or ()))]:
                flags[name.lstrip("-").replace("-", "_")] = (field.name, hint)
    return flags


def dash(name: str) -> str:
    return "--" + name.replace("_", "-")


def flag_field(token: str, flags: dict) -> str | None:
    """'--alpha-ds', '--lam=3', '--no-save-model' → the field it sets (None: the script has no such flag)."""
    name = token.lstrip("-").split("=", 1)[0].replace("-", "_")
    if name.startswith("no_") and flags.get(name[3:], (0, 0))[1] is bool:
        name = name[3:]
    return flags[name][0] if name in flags else None


def label(tokens: list[str]) -> list[str]:
    """['--lam', '1', '--lsgan', '--alpha-ds', '0.5', '1'] → ['lam=1', 'lsgan', 'alpha-ds=0.5+1'] (job names)."""
    parts = []
    for token in tokens:
        if token.startswith("--") or not parts:
            parts.append(token.lstrip("-"))
        else:
            parts[-1] += ("+" if "=" in parts[-1] else "=") + token
    return parts


def check_flags(argv: list[str], flags: dict, script: str) -> None:
    for token in (t for t in argv if t.startswith("--") and t != "--"):
        field = flag_field(token, flags)
        if field is None:
            raise SystemExit(f"error: {script} has no flag {token.split('=')[0]} (see python {script} --help)")
        if field in OWNED:
            raise SystemExit(f"error: {dash(field)} is set by the sweep for every job: drop it (to continue a sweep, "
                             "run the same command again)")


def parse_grid(specs: list[str], flags: dict, argv: list[str], script: str) -> list[tuple[str, list[list[str]]]]:
    """--grid NAME=V1,V2 → [(field, [the flag tokens of each value])]. A value may hold several words for a list
    flag ('alpha-ds=0.5 1.0,0.7'); a switch takes true,false."""
    given, grid = {flag_field(t, flags) for t in argv if t.startswith("--")}, []
    for spec in specs:
        name, sep, values = spec.partition("=")
        name, values = name.strip().lstrip("-"), [v.strip() for v in values.split(",")]
        if not sep or not name or not all(values):
            raise SystemExit(f"error: --grid '{spec}' is not NAME=V1,V2,...: e.g. --grid lam=1,3,5,10")
        field = flag_field(name, flags)
        if field is None:
            raise SystemExit(f"error: --grid {name}: {script} has no flag {dash(name)} (see python {script} --help)")
        if field in OWNED or field in given or field in (f for f, _ in grid):
            raise SystemExit(f"error: --grid {name}: {dash(field)} is set twice (by the sweep, another --grid or the "
                             "script flags): keep one")
        if flags.get(name.replace("-", "_"), (0, 0))[1] is bool:
            if not all(v.lower() in ("true", "false") for v in values):
                raise SystemExit(f"error: --grid {name}: {dash(name)} is a switch: give true,false")
            grid.append((field, [[dash(name) if v.lower() == "true" else "--no-" + dash(name)[2:]] for v in values]))
        else:
            grid.append((field, [[dash(name), *shlex.split(v)] for v in values]))
    return grid


def parse_job_args(module, argv: list[str]):
    """The script's own parser on a job's flags; its complaint (tyro's box) reduced to one line."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
            return module.parse_args(argv)
    except SystemExit as error:
        if isinstance(error.code, str):
            raise SystemExit(error.code.strip().splitlines()[0]) from None
        lines = [line.strip(" │╭╮╰╯") for line in out.getvalue().splitlines() if line.strip(" │╭╮╰╯")]
        cuts = [i for i, line in enumerate(lines) if set(line.strip()) <= set("-─")] + [len(lines)] * 2
        message = " ".join(line.strip() for line in lines[cuts[0] + 1:cuts[1]]) or " ".join(lines)[:300]
        raise SystemExit(f"error: {module.__name__}.py {shlex.join(argv)}: {message}") from None


# ---------------------------------------------------------------- the manifest (one JSON line per job) and locks

@contextlib.contextmanager
def locked(path: Path, block: bool = True):
    """An exclusive flock on `path`: yields the open file, or None if `block` is False and another process has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            handle = None
        yield handle


def read_manifest(sweep_dir: Path) -> list[dict]:
    path = sweep_dir / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def update_manifest(sweep_dir: Path, edit) -> None:
    """entries → edit(entries), under a lock: the jobs (other processes, other nodes) write it too."""
    with locked(sweep_dir / "manifest.lock"):
        tmp = sweep_dir / f"manifest.jsonl.{os.getpid()}.tmp"
        tmp.write_text("".join(json.dumps(e) + "\n" for e in edit(read_manifest(sweep_dir))))
        os.replace(tmp, sweep_dir / "manifest.jsonl")


def set_job(sweep_dir: Path, job: str, **changes) -> None:
    update_manifest(sweep_dir, lambda entries: [{**e, **changes} if e["job"] == job else e for e in entries])


def job_state(sweep_dir: Path, job: str) -> str:
    return next(e["state"] for e in read_manifest(sweep_dir) if e["job"] == job)


def job_is_alive(sweep_dir: Path, job: str) -> bool:
    """A running job (its wrapper and the script it started) holds logs/JOB.lock; a dead one holds nothing."""
    with locked(sweep_dir / "logs" / f"{job}.lock", block=False) as handle:
        return handle is None


# ---------------------------------------------------------------- one job: a plain run of the script

def state_of(code: int, run_dir: Path) -> str:
    """Exit code → state: 0 finished (or results.json's status), 3 diverged, 130 or a signal interrupted, other
    codes failed."""
    if code == 0 and (run_dir / "results.json").exists():
        status = json.loads((run_dir / "results.json").read_text()).get("status")
        return status if status in STATES else "finished"
    return {0: "finished", 3: "diverged", 130: "interrupted"}.get(code, "interrupted" if code < 0 else "failed")


class Job:
    """What submitit runs (here, on a node of the array, or in-process): the script as a subprocess, its outcome
    recorded in the manifest; the last job to end writes the table. checkpoint() is submitit's preemption and
    timeout hook: it stops the script (SIGTERM: it saves its checkpoint, exits 130) and resubmits this job, which
    then continues the run with --resume."""

    def __init__(self, sweep_dir: Path, script: Path, job: str, flags: list[str]):
        self.sweep_dir, self.script, self.job, self.flags = str(sweep_dir), str(script), job, flags

    def __getstate__(self):  # the running subprocess is not part of what gets pickled and resubmitted
        return {k: v for k, v in self.__dict__.items() if k != "child"}

    def __call__(self) -> str:
        sweep_dir, interrupted = Path(self.sweep_dir), False
        run_dir = sweep_dir / "runs" / self.job
        with locked(sweep_dir / "logs" / f"{self.job}.lock", block=False) as lock:
            if lock is None:
                print(f"{self.job} is already running elsewhere: not started twice")
                return "running"
            resume = (run_dir / "args.json").exists() and any(run_dir.rglob("checkpoint*.pt"))
            if run_dir.exists() and not resume:  # nothing to continue from: set the remains aside, start afresh
                stale = (run_dir.with_name(f"{self.job}.stale{i}") for i in itertools.count(1))
                run_dir.rename(next(p for p in stale if not p.exists()))
            fresh = [*self.flags, "--run-name", self.job, "--output-dir", str(run_dir.parent)]
            command = [sys.executable, self.script, *(["--resume", str(run_dir)] if resume else fresh)]
            with open(sweep_dir / "logs" / f"{self.job}.log", "a") as log:
                log.write(f"\n$ {shlex.join(command)}\n")
                log.flush()
                self.child = subprocess.Popen(  # the script holds the lock too: a script left behind still counts
                    command, stdout=log, stderr=subprocess.STDOUT, pass_fds=(lock.fileno(),),
                    preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN))  # USR2 is for submitit only
                attempts = next(e["attempts"] for e in read_manifest(sweep_dir) if e["job"] == self.job) + 1
                set_job(sweep_dir, self.job, state="running", exit_code=None, attempts=attempts, resumed=resume,
                        host=socket.gethostname(), pid=self.child.pid)
                try:
                    while self.child.poll() is None:  # polling, not wait(): checkpoint() may run in between
                        time.sleep(0.2)
                except KeyboardInterrupt:  # Ctrl-C: the script stops at its next step boundary and saves
                    interrupted = True
                    self.child.send_signal(signal.SIGTERM)
                    self.child.wait()
            state = state_of(self.child.returncode, run_dir)
            set_job(sweep_dir, self.job, state=state, exit_code=self.child.returncode)
        if interrupted:
            raise KeyboardInterrupt
        if not any(e["state"] in ("pending", "running") for e in read_manifest(sweep_dir)):
            try:  # a table that cannot be built never fails the job
                write_report(sweep_dir)
            except Exception as error:  # noqa: BLE001
                print(f"the table could not be built ({error!r}): python sweep.py --report {sweep_dir}")
        return state

    def checkpoint(self):
        import submitit
        child = getattr(self, "child", None)
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
            deadline = time.time() + 60
            while child.poll() is None and time.time() < deadline:
                time.sleep(0.5)
        set_job(Path(self.sweep_dir), self.job, state="interrupted", exit_code=child and child.returncode)
        return submitit.helpers.DelayedSubmission(Job(Path(self.sweep_dir), Path(self.script), self.job, self.flags))


# ---------------------------------------------------------------- executors

def executor_module():
    import cloudpickle
    import submitit
    if __name__ != "__main__":  # imported (not run): job processes get this module's code by value
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return submitit


def visible_gpus() -> list[int]:
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [int(x) for x in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if x.strip().isdigit()]
    import torch
    return list(range(torch.cuda.device_count()))


def run_local(jobs: list[Job], sweep_dir: Path, opts) -> None:
    """submitit's LocalExecutor: at most --max-parallel jobs at a time, each on its own GPU (round robin) if any."""
    executor = executor_module().LocalExecutor(folder=sweep_dir / "logs" / "submitit")
    gpus, queue, active = visible_gpus(), list(jobs), {}
    try:
        while queue or active:
            for slot in (s for s in range(opts.max_parallel) if s not in active and queue):
                gpu = [gpus[slot % len(gpus)]] if gpus else []
                executor.update_parameters(timeout_min=opts.time or 60 * 24 * 365, gpus_per_node=len(gpu),
                                           visible_gpus=gpu)
                job = queue.pop(0)
                active[slot] = (job, executor.submit(job))
                print(f"started {job.job}" + (f" on GPU {gpu[0]}" if gpu else ""))
            for slot, (job, handle) in list(active.items()):
                if handle.done() and not job_is_alive(sweep_dir, job.job):
                    del active[slot]
                    state = job_state(sweep_dir, job.job)
                    if state in ("pending", "running"):  # its process died before it could say so
                        state = {"pending": "failed", "running": "interrupted"}[state]
                        set_job(sweep_dir, job.job, state=state)
                    print(f"{job.job}: {state}")
            time.sleep(0.5)
    except KeyboardInterrupt:  # each running script gets SIGTERM: it saves its checkpoint and exits 130
        pids = {e["job"]: e.get("pid") for e in read_manifest(sweep_dir)}
        for job, handle in active.values():
            if job_state(sweep_dir, job.job) == "running" and job_is_alive(sweep_dir, job.job):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pids[job.job], signal.SIGTERM)
            else:
                handle.cancel(check=False)
        while any(not handle.done() or job_is_alive(sweep_dir, job.job) for job, handle in active.values()):
            time.sleep(0.5)
        for job, _ in active.values():
            if job_state(sweep_dir, job.job) in ("pending", "running"):
                set_job(sweep_dir, job.job, state="interrupted")
        raise


def submit_slurm(jobs: list[Job], sweep_dir: Path, opts) -> None:
    """One SLURM job array: a preempted or timed-out job is requeued (submitit) and continues with --resume."""
    executor = executor_module().SlurmExecutor(folder=sweep_dir / "logs" / "submitit")
    params = {"job_name": sweep_dir.name, "time": opts.time, "partition": opts.partition,
              "gpus_per_node": 1 if opts.gpus_per_job is None else opts.gpus_per_job or None,
              "cpus_per_task": opts.cpus_per_job, "mem": opts.mem_gb and f"{opts.mem_gb}G",
              "array_parallelism": opts.array_parallelism, "setup": opts.slurm_extra or None}  # sbatch reads #SBATCH
    # lines up to the first command, and submitit writes the setup lines right after its own
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    try:
        with executor.batch():
            handles = [executor.submit(job) for job in jobs]
    except Exception as error:  # noqa: BLE001 (sbatch refused: partition, account, limits ...)
        update_manifest(sweep_dir, lambda entries: [{**e, "state": "failed"} if e["state"] == "pending" else e
                                                    for e in entries])
        raise SystemExit(f"error: sbatch refused the array: {str(error).strip().splitlines()[0]}") from None
    ids = {job.job: handle.job_id for job, handle in zip(jobs, handles)}
    update_manifest(sweep_dir, lambda entries: [{**e, "slurm_job_id": ids[e["job"]]} if e["job"] in ids else e
                                                for e in entries])
    print(f"submitted {len(jobs)} job(s) as SLURM job {handles[0].job_id.split('_')[0]}; "
          f"follow them with: python sweep.py --status {sweep_dir}")


# ---------------------------------------------------------------- status and the table

def status_table(sweep_dir: Path) -> str:
    entries = read_manifest(sweep_dir)
    counts = ", ".join(f"{n} {s}" for s in STATES if (n := sum(e["state"] == s for e in entries)))
    lines = [f"{sweep_dir}: {len(entries)} jobs: {counts}", "", "| job | state | exit code | attempts | run folder |",
             "|---|---|---|---|---|"]
    for e in entries:
        stale = e["state"] == "running" and not job_is_alive(sweep_dir, e["job"])
        state = "running? (no live process holds it: run the command again)" if stale else e["state"]
        lines.append(f"| {e['job']} | {state} | {e['exit_code']} | {e['attempts']} | {e['run_dir']} |")
    return "\n".join(lines) + "\n"


def run_results(run_dir: Path) -> list[dict]:
    """The results.json of each configuration of a run (run_dir/CONFIG/results.json), else the run's own."""
    paths = sorted(run_dir.glob("*/results.json")) or [run_dir / "results.json"]
    return [json.loads(p.read_text()) for p in paths if p.exists()]


def csv_rows(markdown: str) -> list[list[str]]:
    """The rows of every Markdown table in `markdown` (separator lines dropped, a blank row between tables)."""
    rows = []
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and not all(set(c) <= set("-: ") for c in cells):
            rows.append(cells)
        elif not line.startswith("|") and rows and rows[-1]:
            rows.append([])
    return rows


def write_report(sweep_dir: Path) -> str:
    """table.md: the jobs missing from the table (never averaged over), then the script's summarize() over the
    finished and diverged runs; table.csv: that table's rows."""
    info, entries = json.loads((sweep_dir / "sweep.json").read_text()), read_manifest(sweep_dir)
    results, missing = [], []
    for e in entries:
        found = run_results(sweep_dir / e["run_dir"]) if e["state"] in DONE else []
        results, missing = results + found, missing + ([] if found else [e])
    table = load_script(info["script"]).summarize(results) if results else "(no finished run yet)\n"
    lines = [f"# {Path(info['script']).name} sweep {sweep_dir.name}: {len(entries) - len(missing)} of {len(entries)} "
             "jobs", "", f"    {info['command']}", ""]
    if missing:
        lines += [f"**Incomplete: {len(missing)} job(s) are missing from the table below.**", "",
                  "| missing job | state | exit code | log |", "|---|---|---|---|",
                  *(f"| {e['job']} | {e['state']} | {e['exit_code']} | {e['log']} |" for e in missing), ""]
    (sweep_dir / "table.md").write_text(report := "\n".join(lines) + "\n" + table)
    with open(sweep_dir / "table.csv", "w", newline="") as f:
        csv.writer(f).writerows(csv_rows(table))
    return report


# ---------------------------------------------------------------- the command line

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 1, like the scripts
        raise SystemExit(f"error: {message}")


def build_parser() -> Parser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add = p.add_argument
    add("--grid", action="append", default=[], metavar="NAME=V1,V2", help="a flag and its values (repeatable)")
    add("--also", action="append", default=[], metavar="'FLAGS'",
        help="one more job with these flags besides the grid, e.g. a baseline (repeatable)")
    add("--seed-chunks", metavar="N:K", help="N stacked seeds split into jobs of K (scripts with --num-seeds)")
    add("--name", help="sweep folder name (default: the script's name and a hash of grid, chunks and flags)")
    add("--output-dir", default="runs", help="the sweep goes to OUTPUT_DIR/sweeps/NAME (default: runs)")
    add("--executor", choices=("local", "slurm", "debug"), default="local",
        help="local: processes on this machine (default); slurm: one job array; debug: one by one in this process")
    add("--max-parallel", type=int, default=1, help="local: jobs at a time, each on its own GPU when several")
    add("--time", type=int, help="minutes per job (slurm: required; a job past it is requeued and resumed)")
    add("--partition", help="slurm: partition")
    add("--gpus-per-job", type=int, help="slurm: GPUs per job (default 1)")
    add("--cpus-per-job", type=int, help="slurm: CPUs per job")
    add("--mem-gb", type=int, help="slurm: memory per job, GB")
    add("--array-parallelism", type=int, help="slurm: jobs of the array running at once (default 256)")
    add("--slurm-extra", action="append", default=[], metavar="'#SBATCH --OPT=V'", help="slurm: an extra sbatch line")
    add("--dry-run", action="store_true", help="print each job's command; write and submit nothing")
    add("--status", metavar="DIR", help="print the state of every job of a sweep folder")
    add("--report", metavar="DIR", help="build a sweep folder's table from the runs finished so far")
    add("script", nargs="?", help="the script to sweep, e.g. adaptive_wgan.py")
    add("flags", nargs=argparse.REMAINDER, help="the script's flags, passed to every job")
    return p


def plan(opts, notes: list[str]) -> tuple[Path, Path, list[dict], str]:
    """Check everything and expand the jobs; writes nothing. Returns (script, sweep folder, jobs, sweep key)."""
    script = Path(opts.script)
    if not script.is_file() and (Path(__file__).parent / opts.script).is_file():
        script = Path(__file__).parent / opts.script
    if script.suffix != ".py" or not script.is_file():
        raise SystemExit(f"error: no script {opts.script}: give a path such as adaptive_wgan.py")
    script, module = script.resolve(), load_script(script)
    fields, flags = script_flags(module), list(opts.flags)
    check_flags(flags, fields, script.name)
    grid = parse_grid(opts.grid, fields, flags, script.name)
    if "save_model" in fields and not {"--save-model", "--no-save-model"} & set(flags):
        flags.append("--save-model")
        notes.append("note: added --save-model, so that an interrupted job continues from its checkpoint "
                     "(pass --no-save-model to the script to opt out)")
    chunks = [[]]
    if opts.seed_chunks:
        match = re.fullmatch(r"(\d+):(\d+)", opts.seed_chunks)
        if not match or not 1 <= int(match[2]) <= int(match[1]):
            raise SystemExit(f"error: --seed-chunks {opts.seed_chunks} is not N:K with 1 ≤ K ≤ N: e.g. 200:50")
        if not {"seed", "num_seeds"} <= set(fields):
            raise SystemExit(f"error: --seed-chunks needs a script with --seed and --num-seeds; {script.name} has not")
        if any(flag_field(t, fields) == "num_seeds" for t in flags if t.startswith("--")):
            raise SystemExit("error: --num-seeds is set by --seed-chunks N:K (N seeds in all): drop it")
        n, k, first = int(match[1]), int(match[2]), parse_job_args(module, flags).seed
        chunks = [["--seed", str(first + s), "--num-seeds", str(min(k, n - s))] for s in range(0, n, k)]
    also = [shlex.split(extra) for extra in opts.also]
    for extra in also:
        check_flags(extra, fields, script.name)
    for tokens in [[]] + [t for _, values in grid for t in values] + chunks + also:  # before anything is written
        parse_job_args(module, flags + tokens)
    combos = [[t for v in values for t in v] for values in itertools.product(*(tokens for _, tokens in grid))]
    jobs = []
    for i, (extra, chunk) in enumerate(itertools.product(combos + also, chunks)):
        seeds = [f"seeds={chunk[1]}-{int(chunk[1]) + int(chunk[3]) - 1}"] if chunk else []
        name = re.sub(r"[^A-Za-z0-9.=+_-]", "_", "_".join([f"{i:03d}", *label(extra), *seeds]))[:120]
        jobs.append({"job": name, "flags": flags + extra + chunk, "run_dir": f"runs/{name}", "log": f"logs/{name}.log",
                     "state": "pending", "exit_code": None, "attempts": 0})
    key = json.dumps({"script": script.name, "grid": opts.grid, "also": opts.also, "seed_chunks": opts.seed_chunks,
                      "flags": opts.flags})
    name = opts.name or f"{script.stem}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    return script, Path(opts.output_dir) / "sweeps" / name, jobs, key


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = build_parser().parse_args(argv)
    # Ctrl-C or kill -INT stops the sweep cleanly also when it was started in the background (`cmd &` in a
    # script): the shell starts such commands with SIGINT ignored, and Python then installs no handler of its own
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if opts.status or opts.report:
        if not (Path(opts.status or opts.report) / "sweep.json").exists():
            raise SystemExit(f"error: {opts.status or opts.report} is not a sweep folder (runs/sweeps/NAME)")
        print(status_table(Path(opts.status)) if opts.status else write_report(Path(opts.report)))
        return 0
    if not opts.script:
        raise SystemExit("error: give a script to sweep: python sweep.py [sweep options] SCRIPT [script flags]")
    if opts.executor != "slurm" and (given := [dash(o) for o in SLURM_OPTIONS if getattr(opts, o)]):
        raise SystemExit(f"error: {', '.join(given)} apply to --executor slurm: add it or drop them")
    if opts.executor == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise SystemExit("error: --executor slurm needs SLURM's sbatch and srun on PATH: run this on the cluster's "
                         "login node, or use --executor local")
    if opts.executor == "slurm" and not opts.time:
        raise SystemExit("error: --executor slurm needs --time MINUTES per job (a job past it is requeued and resumed)")
    if opts.max_parallel < 1:
        raise SystemExit("error: --max-parallel must be ≥ 1")
    if bad := [line for line in opts.slurm_extra if not re.fullmatch(r"#SBATCH --\S.*", line)]:
        raise SystemExit(f"error: --slurm-extra '{bad[0]}' is not an sbatch line: e.g. '#SBATCH --account=abc'")
    notes = []
    script, sweep_dir, jobs, key = plan(opts, notes)
    for note in notes:
        print(note)
    if opts.dry_run:
        print("\n".join(f"{job['job']}: python {script.name} {shlex.join(job['flags'])}" for job in jobs))
        return 0
    if (sweep_dir / "sweep.json").exists() and json.loads((sweep_dir / "sweep.json").read_text())["key"] != key:
        raise SystemExit(f"error: {sweep_dir} holds another sweep (other script, grid or flags): choose another --name")
    (sweep_dir / "logs").mkdir(parents=True, exist_ok=True)
    if not (sweep_dir / "sweep.json").exists():
        command = shlex.join(["python", "sweep.py", *argv])
        (sweep_dir / "sweep.json").write_text(json.dumps({"script": str(script), "key": key, "command": command}))
    todo = []

    def merge(old: list[dict]) -> list[dict]:  # finished and diverged jobs are kept, live ones left alone
        known = {e["job"]: e for e in old}
        entries = [known.get(job["job"], job) for job in jobs]
        todo.extend(e["job"] for e in entries if e["state"] not in DONE and not job_is_alive(sweep_dir, e["job"]))
        return [{**e, "state": "pending"} if e["job"] in todo else e for e in entries]

    update_manifest(sweep_dir, merge)
    print(f"sweep {sweep_dir}: {len(jobs)} jobs, {len(jobs) - len(todo)} done or running, {len(todo)} to run")
    runs = [Job(sweep_dir.resolve(), script, job["job"], job["flags"]) for job in jobs if job["job"] in todo]
    try:
        if opts.executor == "slurm":
            if runs:
                submit_slurm(runs, sweep_dir, opts)
            return 0
        if opts.executor == "local":
            run_local(runs, sweep_dir, opts)
        for job in runs if opts.executor == "debug" else []:
            job()
    except KeyboardInterrupt:
        print(f"interrupted: run the same command again to continue (python sweep.py --status {sweep_dir})")
        return 130
    print(write_report(sweep_dir))
    return 0 if all(e["state"] in DONE for e in read_manifest(sweep_dir)) else 2


if __name__ == "__main__":
    sys.exit(main())
