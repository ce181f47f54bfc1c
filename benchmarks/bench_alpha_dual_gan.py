"""Speed of the stacked ring training of alpha_dual_gan.py: seed-epochs/s (one epoch = 391 steps of 128
points per seed) for 1 seed and for N stacked seeds, against a plain one-seed loop (nn.Linear layers +
torch.optim.Adam, the usual way to write the experiment), with operator calls per step and peak memory.

    OMP_NUM_THREADS=1 python benchmarks/bench_alpha_dual_gan.py --stacks 1 8 32 --steps 40
    OMP_NUM_THREADS=1 python benchmarks/bench_alpha_dual_gan.py --layers 1 --stacks 1 16 64 --steps 200   # cpu-mini depth
    python benchmarks/bench_alpha_dual_gan.py --stacks 1 50 200 --steps 200      # on a GPU
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import tyro
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import alpha_dual_gan as adg  # noqa: E402
from common.datasets import ring_data  # noqa: E402

STEPS_PER_EPOCH = 391


@dataclass
class Args:
    stacks: tuple[int, ...] = (1, 8, 32)
    """stack sizes (seeds trained at once) to time"""
    steps: int = 40
    """timed steps per stack size (after 3 warm-up steps)"""
    alpha_d: float = 0.5
    """α_D used while timing"""
    alpha_g: float = 1.0
    """α_G used while timing"""
    layers: int = 4
    """hidden layers of G and D (the paper: 4; the cpu-mini preset: 1)"""
    plain: bool = True
    """also time a plain single-seed loop (nn.Sequential of nn.Linear, torch.optim.Adam)"""
    cuda: bool = True
    """use CUDA when available"""


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, num_steps: int, device) -> tuple[int, float]:
    """Warm up with 3 steps, count aten operator calls of one step with the profiler, then time `num_steps`
    steps. Returns (operator calls per step, seconds)."""
    for k in range(3):
        step(k)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(3)
    ops = sum(1 for e in prof.events() if e.name.startswith("aten::"))
    sync(device)
    start = time.perf_counter()
    for k in range(num_steps):
        step(k)
    sync(device)
    return ops, time.perf_counter() - start


def bench_stack(num_seeds: int, args: Args, ring, device) -> dict:
    gen_net, disc_net, gens = adg.ring_networks(list(range(1, num_seeds + 1)), device=device, g_layers=args.layers,
                                                d_layers=args.layers)
    opt_g = adg.adam(gen_net.parameters(), 1e-4, (0.9, 0.99), device)
    opt_d = adg.adam(disc_net.parameters(), 1e-4, (0.9, 0.99), device)
    train, noise = ring.train.to(device), ring.train_noise.to(device)
    perms = torch.stack([torch.randperm(len(train), generator=g, device=device) for g in gens])
    alive = torch.ones(num_seeds, dtype=torch.bool, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step(k):
        idx = perms[:, (k % STEPS_PER_EPOCH) * 128:(k % STEPS_PER_EPOCH + 1) * 128]
        return adg.train_step(gen_net, disc_net, opt_g, opt_d, train[idx], noise[idx], alive, args.alpha_d,
                              args.alpha_g, False)

    ops, seconds = time_steps(step, args.steps, device)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return {"seeds": num_seeds, "steps_per_s": args.steps / seconds,
            "seed_epochs_per_s": num_seeds * args.steps / seconds / STEPS_PER_EPOCH, "ops_per_step": ops,
            "peak_mib": peak}


def bench_plain(args: Args, ring, device) -> dict:
    """One seed written the usual way: nn.Sequential MLPs, probabilities through sigmoid, torch.optim.Adam."""
    torch.manual_seed(0)
    hidden = args.layers - 1
    gen_net = nn.Sequential(nn.Linear(2, 400), nn.ReLU(),
                            *[m for _ in range(hidden) for m in (nn.Linear(400, 400), nn.ReLU())], nn.Linear(400, 2)).to(device)
    disc_net = nn.Sequential(nn.Linear(2, 200), nn.LeakyReLU(0.2),
                             *[m for _ in range(hidden) for m in (nn.Linear(200, 200), nn.LeakyReLU(0.2))],
                             nn.Linear(200, 1)).to(device)
    opt_g = torch.optim.Adam(gen_net.parameters(), 1e-4, betas=(0.9, 0.99))
    opt_d = torch.optim.Adam(disc_net.parameters(), 1e-4, betas=(0.9, 0.99))
    train, noise = ring.train.to(device), ring.train_noise.to(device)
    perm = torch.randperm(len(train)).to(device)

    def step(k):
        idx = perm[(k % STEPS_PER_EPOCH) * 128:(k % STEPS_PER_EPOCH + 1) * 128]
        fake = gen_net(noise[idx])
        d_loss = (adg.alpha_loss(disc_net(train[idx]), 1, args.alpha_d).mean()
                  + adg.alpha_loss(disc_net(fake.detach()), 0, args.alpha_d).mean())
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        g_loss = -adg.alpha_loss(disc_net(fake), 0, args.alpha_g).mean()
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()

    ops, seconds = time_steps(step, args.steps, device)
    return {"seeds": "1 (plain loop)", "steps_per_s": args.steps / seconds,
            "seed_epochs_per_s": args.steps / seconds / STEPS_PER_EPOCH, "ops_per_step": ops, "peak_mib": float("nan")}


if __name__ == "__main__":
    args = tyro.cli(Args)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    ring = ring_data()
    print(f"device {device}, torch threads {torch.get_num_threads()}, {args.steps} timed steps, "
          f"α = ({args.alpha_d}, {args.alpha_g}), {args.layers} hidden layers, one epoch = {STEPS_PER_EPOCH} steps of 128")
    rows = [bench_plain(args, ring, device)] if args.plain else []
    for n in args.stacks:
        rows.append(bench_stack(n, args, ring, device))
    print(f"{'seeds':>16} {'steps/s':>9} {'seed-epochs/s':>14} {'s per seed-epoch':>17} {'aten ops/step':>14} {'peak MiB':>9}")
    for r in rows:
        print(f"{str(r['seeds']):>16} {r['steps_per_s']:9.2f} {r['seed_epochs_per_s']:14.4f} "
              f"{1 / r['seed_epochs_per_s']:17.2f} {r['ops_per_step']:14d} {r['peak_mib']:9.1f}")
    print(f"max RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
