"""Generator iterations per second of wgan_optimizer_study.py for one cell and for stacks of N cells, in one mode
(--compile, --matmul-precision) or in all four (--matrix: eager / compiled × highest / medium, fresh processes).

    python benchmarks/bench_wgan_optimizer_study.py --matrix --cells 1 3 --steps 5 --threads 2   # CPU, four modes
    python benchmarks/bench_wgan_optimizer_study.py --cells 1 3 --steps 3 --threads 1            # CPU, eager, float32
    python benchmarks/bench_wgan_optimizer_study.py --matrix --cells 1 21                        # GPU: Table I's grid

One generator iteration = what one iteration of the script does for every cell of the stack: 5 critic steps
(each with the gradient penalty) on one real batch, then one generator step, then the stacked optimiser updates.
The cells cycle through SGD / RMSprop / Adam. Random data in [-1, 1] stands in for MNIST (the cost does not
depend on the pixels). Printed per stack size: generator iterations/s of the stack, cell-iterations/s
(= stack size × that), peak memory (CUDA: max allocated; CPU: the process's peak RSS so far, so run sizes in
increasing order) and the operator calls per iteration the program issues (aten ops not nested in another op),
which must not grow with the stack size, and the operator calls of benchmarks/harness.py (leaf operators and
compiled kernels: on a GPU, kernel launches).
"""
from __future__ import annotations

import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from typing import Literal

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402
from wgan_optimizer_study import (Args, StackedOptimizer, iteration, make_critic, make_generator,  # noqa: E402
                                  stack_params, train_iteration)


@dataclass
class BenchArgs:
    cells: tuple[int, ...] = (1, 21)
    """stack sizes to time (21 = Table I's grid)"""
    steps: int = 10
    """timed generator iterations per stack size (after warm-up)"""
    warmup: int = 2
    """untimed iterations first"""
    batch_size: int = 128
    """real images per step (the paper: 128)"""
    n_critic: int = 5
    """critic steps per generator step (the paper: 5)"""
    cuda: bool = True
    """use CUDA when available"""
    threads: int = 0
    """torch.set_num_threads (0: PyTorch's default)"""
    baseline: bool = True
    """also time one cell written the usual way (nn.Sequential, torch.optim.Adam, autograd GP; eager only)"""
    compile: bool = False
    """torch.compile the iteration (as wgan_optimizer_study.py --compile)"""
    matmul_precision: Literal["highest", "high", "medium"] = "highest"
    """float32 matmul precision of training (as wgan_optimizer_study.py --matmul-precision)"""
    matrix: bool = False
    """run all four modes (eager / compiled × highest / medium), each in a fresh process, and print one table"""


def top_level_op_counts(prof) -> Counter:
    """Operator calls a profiled region issued itself: aten ops not nested inside another aten op."""
    counts = Counter()
    for event in prof.events():
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if event.name.startswith("aten::") and parent is None:
            counts[event.name] += 1
    return counts


def measure(bench: BenchArgs, num_cells: int, device: torch.device) -> dict:
    args = Args(dataset="fake", batch_size=bench.batch_size, n_critic=bench.n_critic)
    torch.manual_seed(0)
    g_params = [p.detach().to(device).requires_grad_(True) for p in stack_params(make_generator(), num_cells)]
    d_params = [p.detach().to(device).requires_grad_(True) for p in stack_params(make_critic(), num_cells)]
    names = (["sgd", "rmsprop", "adam"] * num_cells)[:num_cells]
    lrs = [1e-4] * num_cells
    g_opt, d_opt = StackedOptimizer(g_params, names, lrs), StackedOptimizer(d_params, names, lrs)
    gen = torch.Generator(device).manual_seed(0)
    data = torch.rand(4 * bench.batch_size, 784, device=device, generator=gen) * 2 - 1
    alive = torch.ones(num_cells, dtype=torch.bool, device=device)
    torch._dynamo.reset()
    fn = torch.compile(iteration) if bench.compile else iteration   # as the script's switch

    def step(_=None):
        real = data[torch.randint(len(data), (bench.batch_size,), device=device, generator=gen)]
        return train_iteration(g_params, d_params, g_opt, d_opt, real, alive, args, gen, fn)

    for _ in range(bench.warmup):   # compiles here
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    ops = sum(top_level_op_counts(prof).values())
    calls, top, _ = harness.op_calls(step, top=6)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(bench.warmup + bench.steps):
        if i == bench.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        stats, _ = step()
    stats.sum().item()  # wait for the device
    elapsed = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    return {"cells": num_cells, "it_s": bench.steps / elapsed, "peak_mib": peak, "ops": ops, "op_calls": calls,
            "top_ops": top}


def measure_plain(bench: BenchArgs, device: torch.device) -> float:
    """Generator iterations/s of one cell as plain PyTorch: the reference point for the stacked code."""
    torch.manual_seed(0)
    G, D = make_generator().to(device), make_critic().to(device)
    g_opt, d_opt = torch.optim.Adam(G.parameters(), lr=1e-4), torch.optim.Adam(D.parameters(), lr=1e-4)
    data = torch.rand(4 * bench.batch_size, 784, device=device) * 2 - 1
    B = bench.batch_size
    for i in range(bench.warmup + bench.steps):
        if i == bench.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        real = data[torch.randint(len(data), (B,), device=device)]
        for _ in range(bench.n_critic):
            fake = G(torch.randn(B, 128, device=device)).flatten(1).detach()
            eps = torch.rand(B, 1, device=device)
            interp = (eps * real + (1 - eps) * fake).requires_grad_(True)
            (grad,) = torch.autograd.grad(D(interp).sum(), interp, create_graph=True)
            loss = D(fake).mean() - D(real).mean() + 10 * ((grad.norm(2, dim=1) - 1) ** 2).mean()
            d_opt.zero_grad(set_to_none=True)
            loss.backward()
            d_opt.step()
        g_loss = -D(G(torch.randn(B, 128, device=device))).mean()
        g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        g_opt.step()
    g_loss.item()
    return bench.steps / (time.perf_counter() - start)


COLUMNS = {"mode": "mode", "cells": "cells", "it_s": "G-iter/s", "cell_it_s": "cell-iter/s",
           "s_per_cell_it": "s per cell-iter", "op_calls": "operator calls / iter", "ops": "top-level aten ops / iter",
           "peak_mib": "peak MiB (CPU: process so far)"}

if __name__ == "__main__":
    bench = tyro.cli(BenchArgs)
    if bench.matrix:
        print(harness.markdown(harness.run_matrix(__file__, sys.argv[1:]), COLUMNS))
        sys.exit()
    harness.setup(bench.compile, bench.matmul_precision, bench.threads)
    device = torch.device("cuda" if bench.cuda and torch.cuda.is_available() else "cpu")
    mode = harness.mode_name(bench.compile, bench.matmul_precision)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"device: {name}, torch {torch.__version__}, {mode}; batch {bench.batch_size}, {bench.n_critic} critic "
          "steps per generator iteration", file=sys.stderr)
    rows = []
    if bench.baseline and not bench.compile:
        it_s = measure_plain(bench, device)
        rows.append({"mode": mode, "cells": "1 (plain PyTorch)", "it_s": it_s, "cell_it_s": it_s, "s_per_cell_it": 1 / it_s})
    for n in sorted(bench.cells):
        r = measure(bench, n, device)
        rows.append({"mode": mode, **r, "cell_it_s": n * r["it_s"], "s_per_cell_it": 1 / (n * r["it_s"])})
    for r in rows:
        harness.emit(r)
    print(harness.markdown(rows, COLUMNS))
