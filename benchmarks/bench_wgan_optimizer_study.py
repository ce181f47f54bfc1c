"""Generator iterations per second of wgan_optimizer_study.py for one cell and for stacks of N cells.

    python benchmarks/bench_wgan_optimizer_study.py                                   # 1 and 21 cells (Table I)
    OMP_NUM_THREADS=1 python benchmarks/bench_wgan_optimizer_study.py --cells 1 3 --steps 3 --threads 1   # CPU

One generator iteration = what one iteration of the script does for every cell of the stack: 5 critic steps
(each with the gradient penalty) on one real batch, then one generator step, then the stacked optimiser updates.
The cells cycle through SGD / RMSprop / Adam. Random data in [-1, 1] stands in for MNIST (the cost does not
depend on the pixels). Printed per stack size: generator iterations/s of the stack, cell-iterations/s
(= stack size × that), peak memory (CUDA: max allocated; CPU: the process's peak RSS so far, so run sizes in
increasing order) and the operator calls per iteration the program issues (aten ops not nested in another op),
which must not grow with the stack size.
"""
from __future__ import annotations

import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wgan_optimizer_study import (Args, StackedOptimizer, make_critic, make_generator, stack_params,  # noqa: E402
                                  train_iteration)


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
    """also time one cell written the usual way (nn.Sequential, torch.optim.Adam, autograd GP)"""


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

    def step():
        real = data[torch.randint(len(data), (bench.batch_size,), device=device, generator=gen)]
        return train_iteration(g_params, d_params, g_opt, d_opt, real, alive, args, gen)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    ops = sum(top_level_op_counts(prof).values())
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
    return {"cells": num_cells, "it_s": bench.steps / elapsed, "peak_mib": peak, "ops": ops}


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


if __name__ == "__main__":
    bench = tyro.cli(BenchArgs)
    if bench.threads > 0:
        torch.set_num_threads(bench.threads)
    device = torch.device("cuda" if bench.cuda and torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"device: {name}; batch {bench.batch_size}, {bench.n_critic} critic steps per generator iteration")
    print(f"{'cells':>5} {'G-iter/s':>9} {'cell-iter/s':>11} {'s/G-iter':>9} {'peak MiB':>9} {'op calls/iter':>13}")
    if bench.baseline:
        it_s = measure_plain(bench, device)
        print(f"plain PyTorch, 1 cell: {it_s:.3f} G-iter/s ({1 / it_s:.3f} s/G-iter)")
    for n in sorted(bench.cells):
        r = measure(bench, n, device)
        print(f"{n:>5} {r['it_s']:>9.3f} {n * r['it_s']:>11.3f} {1 / r['it_s']:>9.3f} {r['peak_mib']:>9.0f} "
              f"{r['ops']:>13}")
