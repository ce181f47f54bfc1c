"""Tests of sweep.py: grids, seed chunks, the manifest, reruns that resume only the unfinished jobs, the SLURM array
that submitit writes (a fake sbatch on PATH) and its requeue, bad input. Most tests sweep a tiny stand-in script
written here that follows the house contract (Args, parse_args, summarize, results.json with a status, exit codes
0 / 3 / 130, --save-model checkpoints and --resume); the paper-script tests compare a sweep's table with the
script's own in-process table."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

STAND_IN = '''"""Stand-in: sums x·(step + 1) over --steps steps; one row per seed with value = sum·seed."""
from __future__ import annotations
import argparse, json, os, signal, sys, threading, time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal
import tyro

@dataclass
class Args:
    preset: Literal["default", "short"] = "default"
    """preset"""
    seed: int = 1
    """first seed"""
    num_seeds: int = 2
    """seeds (stacked)"""
    x: float = 1.0
    """the configuration; negative: diverges (exit 3)"""
    mode: Literal["ok", "crash"] = "ok"
    """crash: raise before writing anything"""
    steps: int = 3
    """steps"""
    pause: float = 0.0
    """seconds per step"""
    kill_at_x: float = 999.0
    """first attempt only: SIGKILL itself after the first step when x equals this"""
    save_model: bool = False
    """checkpoint.pt after every step"""
    output_dir: str = "runs"
    """output folder"""
    run_name: str | None = None
    """run name"""
    resume: str | None = None
    """run folder to continue"""

PRESETS = {"default": Args(), "short": replace(Args(), preset="short", steps=1)}

def parse_args(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="default")
    pre.add_argument("--resume", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.resume is not None:
        saved = json.loads((Path(known.resume) / "args.json").read_text())
        default = replace(Args(**{k: v for k, v in saved.items() if k in {f.name for f in fields(Args)}}),
                          resume=known.resume)
    elif known.preset in PRESETS:
        default = PRESETS[known.preset]
    else:
        raise SystemExit(f"error: unknown --preset '{known.preset}'")
    return tyro.cli(Args, default=default, args=argv)

def summarize(results):
    rows = sorted((r["args"]["x"], s["seed"], s["value"], r["status"]) for r in results for s in r["per_seed"])
    return "| x | seed | value | status |\\n|---|---|---|---|\\n" + "".join(f"| {x} | {s} | {v} | {st} |\\n"
                                                                       for x, s, v, st in rows)

if __name__ == "__main__":
    args = parse_args()
    if args.mode == "crash":
        raise RuntimeError("crash requested")
    run_dir = Path(args.resume) if args.resume else Path(args.output_dir) / (args.run_name or "standin")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "args.json").write_text(json.dumps(asdict(args)))
    step, total = 0, 0.0
    if args.resume:
        saved = json.loads((run_dir / "checkpoint.pt").read_text())
        step, total = saved["step"], saved["total"]
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while step < args.steps and not stop.is_set():
        if step == 1 and args.x == args.kill_at_x and not args.resume:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(args.pause)
        total, step = total + args.x * (step + 1), step + 1
        if args.save_model:
            (run_dir / "checkpoint.pt").write_text(json.dumps({"step": step, "total": total}))
    status = "interrupted" if step < args.steps else "diverged" if args.x < 0 else "finished"
    seeds = range(args.seed, args.seed + args.num_seeds)
    (run_dir / "results.json").write_text(json.dumps({"status": status, "args": asdict(args),
                                                      "per_seed": [{"seed": s, "value": total * s} for s in seeds],
                                                      "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}))
    sys.exit({"interrupted": 130, "diverged": 3}.get(status, 0))
'''


@pytest.fixture
def stand_in(tmp_path) -> Path:
    (tmp_path / "standin.py").write_text(STAND_IN)
    return tmp_path / "standin.py"


def sweep(cwd: Path, *args, check: bool = True, env: dict | None = None, timeout: float = 300):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                "PYTHONHASHSEED": "0", **(env or {})}
    proc = subprocess.run([sys.executable, str(REPO / "sweep.py"), *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"sweep.py {' '.join(map(str, args))} exited {proc.returncode}\n"
                    f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def only_sweep(cwd: Path) -> Path:
    (folder,) = (cwd / "runs" / "sweeps").iterdir()
    return folder


def manifest(sweep_dir: Path) -> dict[str, dict]:
    return {e["job"]: e for e in map(json.loads, (sweep_dir / "manifest.jsonl").read_text().splitlines())}


def table(sweep_dir: Path) -> str:
    """table.md below its header (the command line differs between sweeps)."""
    text = (sweep_dir / "table.md").read_text()
    return text[text.index("| "):]


def expected_rows(xs, seeds, steps):
    """The stand-in's table computed here: value = seed · Σ_{s=1..steps} x·s."""
    return "| x | seed | value | status |\n|---|---|---|---|\n" + "".join(
        f"| {float(x)} | {s} | {float(x) * steps * (steps + 1) / 2 * s} | {'diverged' if x < 0 else 'finished'} |\n"
        for x, s in sorted((x, s) for x in xs for s in seeds))


# ---------------------------------------------------------------- the machinery on the stand-in

def test_debug_and_local_executors_run_the_grid_and_write_the_same_table(tmp_path, stand_in):
    grid = ["--grid", "x=1,-1", "--grid", "preset=default,short"]
    sweep(tmp_path, "--executor", "debug", "--name", "dbg", *grid, "standin.py", "--steps", "4", "--num-seeds", "2")
    sweep(tmp_path, "--executor", "local", "--max-parallel", "2", "--name", "loc", *grid, "standin.py", "--steps", "4",
          "--num-seeds", "2", env={"CUDA_VISIBLE_DEVICES": "3,5"})  # the stand-in only records which it was given
    dbg, loc = tmp_path / "runs/sweeps/dbg", tmp_path / "runs/sweeps/loc"
    jobs = manifest(dbg)
    assert len(jobs) == 4 and manifest(loc).keys() == jobs.keys()
    assert [(e["state"], e["exit_code"]) for e in jobs.values()] == [("finished", 0)] * 2 + [("diverged", 3)] * 2
    gpus = [json.loads((loc / e["run_dir"] / "results.json").read_text())["gpus"] for e in manifest(loc).values()]
    assert set(gpus) == {"3", "5"}  # one GPU per job, both used
    job = jobs["000_x=1_preset=default"]
    assert job["flags"] == ["--steps", "4", "--num-seeds", "2", "--save-model", "--x", "1", "--preset", "default"]
    run = json.loads((dbg / job["run_dir"] / "args.json").read_text())  # each job is a normal run of the script
    assert run["run_name"] == "000_x=1_preset=default" and run["save_model"] and run["x"] == 1.0
    assert Path(run["output_dir"]) == (dbg / "runs").resolve()
    # the preset "short" overrides nothing given on the command line: --steps 4 everywhere (tyro's default = preset)
    assert table(dbg) == table(loc) == expected_rows([1, 1, -1, -1], [1, 2], 4)
    csv_rows = (dbg / "table.csv").read_text().splitlines()
    assert csv_rows[0] == "x,seed,value,status" and csv_rows[1] == "-1.0,1,-10.0,diverged" and len(csv_rows) == 9


def test_seed_chunks_split_the_stack_and_keep_every_seed(tmp_path, stand_in):
    sweep(tmp_path, "--executor", "debug", "--name", "chunked", "--seed-chunks", "5:2", "--grid", "x=1,3",
          "--also", "--x 7 --steps 3", "standin.py", "--seed", "10", "--steps", "5")
    sweep(tmp_path, "--executor", "debug", "--name", "whole", "--grid", "x=1,3", "--also", "--x 7 --steps 3",
          "standin.py", "--seed", "10", "--steps", "5", "--num-seeds", "5")
    chunked = tmp_path / "runs/sweeps/chunked"
    jobs = manifest(chunked)
    assert [(e["flags"][-3], e["flags"][-1]) for e in jobs.values()] == [("10", "2"), ("12", "2"), ("14", "1")] * 3
    assert list(jobs)[-1] == "008_x=7_steps=3_seeds=14-14"  # --also: one more job (here per chunk), not crossed
    rows = expected_rows([1, 3], range(10, 15), 5) + expected_rows([7], range(10, 15), 3).split("\n", 2)[2]
    assert table(chunked) == table(tmp_path / "runs/sweeps/whole") == rows


def test_rerun_resumes_only_the_killed_job_and_gives_the_uninterrupted_table(tmp_path, stand_in):
    args = ["--executor", "debug", "--grid", "x=1,2,3", "standin.py", "--steps", "3"]
    first = sweep(tmp_path, "--name", "s", *args, "--kill-at-x", "2", check=False)
    sweep_dir = tmp_path / "runs/sweeps/s"
    assert first.returncode == 2  # incomplete
    jobs = manifest(sweep_dir)
    assert [e["state"] for e in jobs.values()] == ["finished", "interrupted", "finished"]
    assert jobs["001_x=2"]["exit_code"] == -signal.SIGKILL
    assert "| 001_x=2 | interrupted |" in (sweep_dir / "table.md").read_text()  # listed as missing
    assert "| 2.0 |" not in table(sweep_dir).split("| x |")[1]                  # and not in the table
    finished = {j: (sweep_dir / e["run_dir"] / "results.json").stat().st_mtime_ns
                for j, e in jobs.items() if e["state"] == "finished"}
    second = sweep(tmp_path, "--name", "s", *args, "--kill-at-x", "2")
    assert "3 jobs, 2 done or running, 1 to run" in second.stdout
    jobs = manifest(sweep_dir)
    assert [e["attempts"] for e in jobs.values()] == [1, 2, 1]
    assert jobs["001_x=2"]["resumed"] and jobs["001_x=2"]["state"] == "finished"
    assert "--resume" in (sweep_dir / "logs/001_x=2.log").read_text().splitlines()[-1]
    assert finished == {j: (sweep_dir / jobs[j]["run_dir"] / "results.json").stat().st_mtime_ns for j in finished}
    sweep(tmp_path, "--name", "uninterrupted", *args)
    assert table(sweep_dir) == table(tmp_path / "runs/sweeps/uninterrupted") == expected_rows([1, 2, 3], [1, 2], 3)
    third = sweep(tmp_path, "--name", "s", *args, "--kill-at-x", "2")  # all done: nothing runs again
    assert "3 done or running, 0 to run" in third.stdout
    assert [e["attempts"] for e in manifest(sweep_dir).values()] == [1, 2, 1]


def test_a_killed_job_without_checkpoint_restarts_in_a_fresh_folder(tmp_path, stand_in):
    args = ["--executor", "debug", "--name", "s", "--grid", "x=2", "standin.py", "--no-save-model", "--kill-at-x", "2"]
    sweep(tmp_path, *args, check=False)
    sweep_dir = tmp_path / "runs/sweeps/s"
    assert manifest(sweep_dir)["000_x=2"]["state"] == "interrupted"
    assert sweep(tmp_path, *args, check=False).returncode == 2  # a clean restart (not resumed) is killed again
    assert manifest(sweep_dir)["000_x=2"]["state"] == "interrupted"
    assert (sweep_dir / "runs/000_x=2.stale1/args.json").exists()
    assert "--resume" not in (sweep_dir / "logs/000_x=2.log").read_text()


def test_ctrl_c_stops_the_local_jobs_and_the_same_command_continues_them(tmp_path, stand_in):
    args = ["--max-parallel", "2", "--name", "s", "--grid", "x=1,2", "standin.py", "--steps", "60", "--pause", "0.1"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    # started as `cmd &` starts it in a script: with SIGINT ignored (the sweep must stop on it all the same)
    proc = subprocess.Popen([sys.executable, str(REPO / "sweep.py"), *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    sweep_dir = tmp_path / "runs/sweeps/s"
    deadline = time.time() + 120
    checkpoints = [sweep_dir / f"runs/{job}/checkpoint.pt" for job in ("000_x=1", "001_x=2")]
    while time.time() < deadline and not all(path.exists() for path in checkpoints):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    jobs = manifest(sweep_dir)
    assert [(e["state"], e["exit_code"]) for e in jobs.values()] == [("interrupted", 130)] * 2
    steps = [json.loads((sweep_dir / e["run_dir"] / "checkpoint.pt").read_text())["step"] for e in jobs.values()]
    assert all(0 < s < 60 for s in steps)
    report = sweep(tmp_path, "--report", sweep_dir).stdout  # interrupted runs wrote results.json: not in the table
    assert "0 of 2 jobs" in report and report.count("| interrupted | 130 |") == 2 and "(no finished run yet)" in report
    sweep(tmp_path, *args)
    assert [(e["state"], e["resumed"]) for e in manifest(sweep_dir).values()] == [("finished", True)] * 2
    assert table(sweep_dir) == expected_rows([1, 2], [1, 2], 60)


def test_status_and_report_at_any_time(tmp_path, stand_in):
    sweep(tmp_path, "--executor", "debug", "--name", "s", "--grid", "x=1,2", "--grid", "mode=ok,crash", "standin.py",
          check=False)
    sweep_dir = tmp_path / "runs/sweeps/s"
    status = sweep(tmp_path, "--status", sweep_dir).stdout
    assert "4 jobs: 2 finished, 2 failed" in status and "| 001_x=1_mode=crash | failed | 1 | 1 |" in status
    (sweep_dir / "table.md").unlink()
    report = sweep(tmp_path, "--report", sweep_dir).stdout
    assert "2 of 4 jobs" in report and "| 003_x=2_mode=crash | failed | 1 | logs/003_x=2_mode=crash.log |" in report
    assert report.split("| x |")[1].count("finished") == 4 and (sweep_dir / "table.md").exists()
    assert "RuntimeError: crash requested" in (sweep_dir / "logs/001_x=1_mode=crash.log").read_text()
    wrong = sweep(tmp_path, "--report", tmp_path, check=False)
    assert wrong.returncode == 1 and wrong.stderr == f"error: {tmp_path} is not a sweep folder (runs/sweeps/NAME)\n"


def test_a_job_whose_sweep_process_died_is_not_started_twice(tmp_path, stand_in):
    """The sweep process is killed (a dropped ssh connection) while its script runs on: the same command run meanwhile
    leaves that job alone; run after the script ended, it records the run."""
    args = ["--executor", "debug", "--name", "s", "--grid", "x=1", "standin.py", "--steps", "25", "--pause", "0.1"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    launcher = subprocess.Popen([sys.executable, str(REPO / "sweep.py"), *args], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "runs/sweeps/s/runs/000_x=1"
    deadline = time.time() + 60
    while time.time() < deadline and not (run_dir / "checkpoint.pt").exists():
        time.sleep(0.1)
    launcher.kill()
    launcher.wait()
    again = sweep(tmp_path, *args, check=False)
    assert "1 jobs, 1 done or running, 0 to run" in again.stdout and again.returncode == 2
    assert "running? (no live process" not in sweep(tmp_path, "--status", "runs/sweeps/s").stdout
    while time.time() < deadline and not (run_dir / "results.json").exists():
        time.sleep(0.1)
    time.sleep(0.5)
    assert "running? (no live process" in sweep(tmp_path, "--status", "runs/sweeps/s").stdout
    sweep(tmp_path, *args)  # the run is complete: it is resumed at its last step and just rewrites its results
    assert manifest(tmp_path / "runs/sweeps/s")["000_x=1"]["attempts"] == 2
    assert table(tmp_path / "runs/sweeps/s") == expected_rows([1], [1, 2], 25)


@pytest.mark.parametrize("args, message", [
    (["nosuch.py"], "no script nosuch.py"),
    (["standin.py", "--xx", "3"], "standin.py has no flag --xx"),
    (["--grid", "x", "standin.py"], "is not NAME=V1,V2"),
    (["--grid", "x=1,,2", "standin.py"], "is not NAME=V1,V2"),
    (["--grid", "lam=1,3", "standin.py"], "has no flag --lam"),
    (["--grid", "x=1,2", "standin.py", "--x", "3"], "--x is set twice"),
    (["--grid", "x=1,abc", "standin.py"], "could not convert string to float: 'abc'"),
    (["--grid", "mode=ok,bad", "standin.py"], "invalid choice 'bad'"),
    (["standin.py", "--run-name", "a"], "--run-name is set by the sweep"),
    (["--seed-chunks", "5", "standin.py"], "is not N:K"),
    (["--seed-chunks", "4:2", "standin.py", "--num-seeds", "3"], "--num-seeds is set by --seed-chunks"),
    (["--executor", "slurm", "--time", "10", "standin.py"], "needs SLURM's sbatch and srun on PATH"),
    (["--partition", "gpu", "standin.py"], "--partition apply to --executor slurm"),
    (["--bogus", "standin.py"], "unrecognized arguments: --bogus"),
    (["--slurm-extra", "--account=abc", "standin.py"], "--slurm-extra: expected one argument"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, stand_in, args, message):
    env = {"PATH": os.path.dirname(sys.executable)}  # no sbatch there
    proc = sweep(tmp_path, *args, check=False, env=env)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- SLURM through a fake sbatch

def fake_slurm(tmp_path: Path) -> dict:
    """sbatch records the script it is given and prints a job id; srun exists; scontrol records its arguments."""
    bin_dir, record = tmp_path / "bin", tmp_path / "slurm_record"
    bin_dir.mkdir()
    record.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {record}/submission.sh\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {record}/scontrol\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def slurm_task(sweep_dir: Path, env: dict, task: int) -> subprocess.Popen:
    """What a node of the array runs for task `task` (the command line of the submission file)."""
    return subprocess.Popen([sys.executable, "-u", "-m", "submitit.core._submit", str(sweep_dir / "logs/submitit")],
                            env={**os.environ, **env, "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": str(5000 + task),
                                 "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": str(task), "SLURM_PROCID": "0",
                                 "SLURM_NTASKS": "1", "CUDA_VISIBLE_DEVICES": ""},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_slurm_array_submission_and_requeue_after_preemption(tmp_path, stand_in):
    env = fake_slurm(tmp_path)
    out = sweep(tmp_path, "--executor", "slurm", "--name", "s", "--partition", "gpu", "--gpus-per-job", "2",
                "--cpus-per-job", "8", "--mem-gb", "32", "--time", "720", "--array-parallelism", "2",
                "--slurm-extra", "#SBATCH --account=abc", "--grid", "x=1,2,3", "standin.py", "--steps", "15",
                "--pause", "0.1", env=env).stdout
    assert "submitted 3 job(s) as SLURM job 4242" in out
    sbatch = (tmp_path / "slurm_record/submission.sh").read_text().splitlines()
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32G", "#SBATCH --time=720", "#SBATCH --account=abc",
                 "#SBATCH --job-name=s", "#SBATCH --signal=USR2@90"):
        assert line in sbatch, "\n".join(sbatch)
    sweep_dir = tmp_path / "runs/sweeps/s"
    jobs = manifest(sweep_dir)
    assert [(e["state"], e["slurm_job_id"]) for e in jobs.values()] == [("pending", f"4242_{i}") for i in range(3)]
    assert not (sweep_dir / "runs").exists()  # submitted, nothing ran here

    node = slurm_task(sweep_dir, env, 1)  # task 1 starts, and is preempted after its first steps: SLURM sends
    deadline = time.time() + 60            # USR2 to every process of the job, the script included
    while time.time() < deadline and not (sweep_dir / "runs/001_x=2/checkpoint.pt").exists():
        time.sleep(0.1)
    os.killpg(node.pid, signal.SIGUSR2)
    assert node.wait(timeout=60) != 0
    assert (tmp_path / "slurm_record/scontrol").read_text() == "requeue 4242_1\n"
    assert manifest(sweep_dir)["001_x=2"]["state"] == "interrupted"
    assert manifest(sweep_dir)["001_x=2"]["exit_code"] == 130  # the script ignored USR2, took SIGTERM and saved
    stopped_at = json.loads((sweep_dir / "runs/001_x=2/checkpoint.pt").read_text())["step"]
    assert 0 < stopped_at < 15
    for task in (1, 0, 2):  # the requeued task runs again (it continues with --resume), then the others
        assert slurm_task(sweep_dir, env, task).wait(timeout=120) == 0
    jobs = manifest(sweep_dir)
    assert [(e["state"], e["attempts"]) for e in jobs.values()] == [("finished", 1), ("finished", 2), ("finished", 1)]
    assert "--resume" in (sweep_dir / "logs/001_x=2.log").read_text()
    assert table(sweep_dir) == expected_rows([1, 2, 3], [1, 2], 15)  # written by the last task to end


# ---------------------------------------------------------------- the paper scripts

def test_adaptive_wgan_dirac_grid_gives_the_in_process_table(tmp_path, run_script):
    grid = ["--grid", "lam=1,3", "--grid", "strategy=fixed,adaptive"]
    sweep(tmp_path, "--executor", "debug", "--name", "dbg", *grid, "adaptive_wgan.py", "--dataset", "dirac",
          "--dirac-steps", "2000")
    sweep(tmp_path, "--executor", "local", "--max-parallel", "2", "--name", "loc", *grid, "adaptive_wgan.py",
          "--dataset", "dirac", "--dirac-steps", "2000")
    run_script("adaptive_wgan.py", "--dataset", "dirac", "--dirac-steps", "2000", "--strategies", "fixed", "adaptive",
               "--lams", "1", "3", "--run-name", "inproc", cwd=tmp_path)
    in_process = (tmp_path / "runs/inproc/results.md").read_text()
    assert "λ = 3" in in_process and in_process.count("| adaptive Dirac-GAN |") == 2
    for name in ("dbg", "loc"):
        assert (tmp_path / "runs/sweeps" / name / "table.md").read_text().endswith("\n\n" + in_process)


def ring_rows(paths) -> dict[tuple, dict]:
    """(configuration, seed) → that seed's final ring metrics, from configurations' results.json files."""
    return {(r["name"], row["seed"]): row for r in map(json.loads, (p.read_text() for p in paths))
            for row in r["history"][-1]["per_seed"]}


def test_alpha_dual_gan_seed_chunks_give_the_unchunked_per_seed_rows_and_table(tmp_path, run_script):
    tiny = ["--num-train", "512", "--widths", "16", "16", "--layers", "1", "1", "--epochs", "3", "--batch-size", "64",
            "--eval-every", "0", "--lr", "3e-3", "--seed", "5", "--alpha-ds", "0.5"]
    sweep(tmp_path, "--executor", "debug", "--name", "chunked", "--seed-chunks", "4:2", "alpha_dual_gan.py", *tiny)
    run_script("alpha_dual_gan.py", *tiny, "--num-seeds", "4", "--run-name", "whole", cwd=tmp_path)
    sweep_dir = tmp_path / "runs/sweeps/chunked"
    assert [e["flags"][-4:] for e in manifest(sweep_dir).values()] == [["--seed", "5", "--num-seeds", "2"],
                                                                       ["--seed", "7", "--num-seeds", "2"]]
    chunked = ring_rows((sweep_dir / "runs").glob("*/*/results.json"))
    whole = ring_rows((tmp_path / "runs/whole").glob("*/results.json"))
    assert sorted(seed for _, seed in chunked) == [5, 6, 7, 8] and chunked == whole  # bit for bit
    assert len({row["kl"] for row in whole.values()}) == 4  # the seeds differ, so the rows say something
    in_process = (tmp_path / "runs/whole/results.md").read_text()
    assert (sweep_dir / "table.md").read_text().endswith("\n\n" + in_process)
