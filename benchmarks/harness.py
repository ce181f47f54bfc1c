"""Shared measuring code of the benchmarks: speed switches, operator calls per step, timing, peak memory, and the
eager / compiled × highest / medium matrix (each mode in a fresh process, so compile caches, thread pools and
the peak-memory figure belong to that mode alone).

A benchmark script uses it like this:

    harness.setup(args.compile, args.matmul_precision, args.threads)   # before building anything
    step = torch.compile(train_step) if args.compile else train_step
    calls, seconds = harness.measure(lambda k: step(...), args.steps, device)
    harness.emit({"mode": harness.mode_name(args.compile, args.matmul_precision), "steps_per_s": args.steps / seconds, "op_calls": calls, ...})

and `harness.run_matrix(__file__, sys.argv[1:])` in its `--matrix` branch.

Operator calls per step: the profiler's events of one step that do work, i.e. `aten::` operators other than
allocation and view operators with no such operator inside them (the innermost working ones), plus the kernels of compiled
graphs (inductor's C++ kernels, profiled by name with `cpp.enable_kernel_profile`). On a GPU each of these is
a kernel launch, so the count is this machine's proxy for launch-bound GPU speed.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

MODES = [(False, "highest"), (False, "medium"), (True, "highest"), (True, "medium")]
# operators that allocate, alias or reshape without running a kernel
NO_KERNEL = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::as_strided", "aten::view",
             "aten::_reshape_alias", "aten::reshape", "aten::detach", "aten::t", "aten::transpose", "aten::expand",
             "aten::resize_", "aten::set_", "aten::alias", "aten::unsqueeze", "aten::squeeze", "aten::select",
             "aten::slice", "aten::permute", "aten::lift_fresh", "aten::split", "aten::split_with_sizes",
             "aten::unbind", "aten::narrow", "aten::_unsafe_view", "aten::view_as", "aten::squeeze_", "aten::chunk",
             "aten::unsqueeze_", "aten::flatten", "aten::unflatten", "aten::expand_as", "aten::numpy_T",
             "aten::result_type", "aten::is_nonzero", "aten::_local_scalar_dense", "aten::item", "aten::resolve_conj", "aten::resolve_neg"}
RESULT = "RESULT "
_BASE_MIB = 0.0  # resident memory when setup() ran (after imports), subtracted from the CPU peak


def setup(compile: bool, matmul_precision: str, threads: int = 0) -> None:
    """Thread count, float32 matmul precision (and TF32 for cuDNN) and, when compiling, kernel names in the
    profiler."""
    global _BASE_MIB
    if os.path.exists("/proc/self/statm"):  # Linux; elsewhere the CPU peak includes the imports
        with open("/proc/self/statm") as f:
            _BASE_MIB = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    if threads:
        torch.set_num_threads(threads)
    torch.set_float32_matmul_precision(matmul_precision)
    torch.backends.cudnn.allow_tf32 = matmul_precision != "highest"
    if compile:
        import torch._inductor.config as inductor_config
        inductor_config.cpp.enable_kernel_profile = True


def mode_name(compile: bool, matmul_precision: str) -> str:
    return f"{'compiled' if compile else 'eager'}, {matmul_precision}"


def kernel_events(events) -> list:
    """The events that do work (see the module docstring): aten operators other than allocation and view ones
    with no such operator anywhere below them (mm counts although it calls resolve_conj; matmul does not, its mm
    does), and compiled kernels."""
    def works(e) -> bool:
        return e.name.startswith("aten::") and e.name not in NO_KERNEL

    def work_below(e) -> bool:
        return any(works(c) or work_below(c) for c in e.cpu_children)

    return [e for e in events if (works(e) and not work_below(e)) or "cpp_fused" in e.name or e.name.startswith("triton_")]


def in_optimizer(event) -> bool:
    """Whether the event runs inside a torch.optim optimizer's step (its profiler range "Optimizer.step#…")."""
    while event is not None:
        if event.name.startswith("Optimizer.step#"):
            return True
        event = event.cpu_parent
    return False


def op_calls(step, k: int = 0, top: int = 0) -> tuple[int, list[tuple[str, int]], int]:
    """Operator calls of one call of step(k), the most frequent names (top > 0), and how many of the calls are
    inside torch.optim optimizers' steps (a for-loop optimizer makes several per parameter tensor)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(k)
    work = kernel_events(prof.events())
    return len(work), Counter(e.name for e in work).most_common(top), sum(map(in_optimizer, work))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step, num_steps: int, device: torch.device, warmup: int = 3, top: int = 8) -> dict:
    """Warm up (compiles happen here), count operator calls of one step, then time num_steps steps."""
    start = time.perf_counter()
    for k in range(warmup):
        step(k)
    sync(device)
    warmup_s = time.perf_counter() - start
    calls, top_names, optimizer_calls = op_calls(step, warmup, top)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    for k in range(warmup + 1, warmup + 1 + num_steps):
        step(k)
    sync(device)
    seconds = time.perf_counter() - start
    return {"steps_per_s": num_steps / seconds, "op_calls": calls, "optimizer_op_calls": optimizer_calls,
            "top_ops": top_names, "warmup_s": warmup_s, "peak_mib": peak_memory_mib(device)}


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: the allocator's peak during the timed steps; CPU: the process's peak resident memory above its size
    when setup() ran, i.e. after the imports (the process runs one mode only under run_matrix)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - _BASE_MIB


def emit(row: dict) -> None:
    """One result row, machine-readable, for run_matrix (and for a reader of the output)."""
    print(RESULT + json.dumps(row, default=str), flush=True)


def run_matrix(script: str, argv: list[str], modes=MODES) -> list[dict]:
    """Run `script argv` once per (compile, precision) mode, each in a fresh process; collect the rows it emits."""
    argv = [a for a in argv if a not in ("--matrix", "--no-matrix")]
    rows = []
    for compile, precision in modes:
        cmd = [sys.executable, script, *argv, "--compile" if compile else "--no-compile",
               "--matmul-precision", precision]
        print(f"# {mode_name(compile, precision)}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if out.returncode != 0:
            sys.stderr.write(out.stdout + out.stderr)
            raise SystemExit(f"error: the {mode_name(compile, precision)} run failed (exit {out.returncode})")
        rows += [json.loads(line[len(RESULT):]) for line in out.stdout.splitlines() if line.startswith(RESULT)]
    return rows


def markdown(rows: list[dict], columns: dict[str, str]) -> str:
    """A markdown table of `rows` with the given {key: header} columns; floats to 4 significant digits."""
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in columns) + " |" for r in rows]
    return "\n".join(lines)
