"""Speed of the stacked ring training of alpha_dual_gan.py: seed-epochs/s (one epoch = 391 steps of 128
points per seed) for 1 seed and for N stacked seeds, against a plain one-seed loop (nn.Linear layers +
torch.optim.Adam, the usual way to write the experiment), with operator calls per step and peak memory, in one
mode (--compile, --matmul-precision) or in all four (--matrix: eager / compiled × highest / medium, each in a
fresh process).

    python benchmarks/bench_alpha_dual_gan.py --matrix --threads 1 --stacks 1 32 --steps 40
    python benchmarks/bench_alpha_dual_gan.py --threads 1 --stacks 1 8 32 --steps 40   # eager, full float32
    python benchmarks/bench_alpha_dual_gan.py --threads 1 --layers 1 --stacks 1 16 64 --steps 200   # cpu-mini depth
    python benchmarks/bench_alpha_dual_gan.py --matrix --stacks 1 50 200 --steps 200   # on a GPU
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import alpha_dual_gan as adg  # noqa: E402
import harness  # noqa: E402
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
    compile: bool = False
    """torch.compile the training step (as alpha_dual_gan.py --compile)"""
    matmul_precision: Literal["highest", "high", "medium"] = "highest"
    """float32 matmul precision of training (as alpha_dual_gan.py --matmul-precision)"""
    threads: int = 0
    """torch threads (0 = torch's default)"""
    matrix: bool = False
    """run all four modes (eager / compiled × highest / medium), each in a fresh process, and print one table"""


def bench_stack(num_seeds: int, args: Args, ring, device) -> dict:
    gen_net, disc_net, gens = adg.ring_networks(list(range(1, num_seeds + 1)), device=device, g_layers=args.layers,
                                                d_layers=args.layers)
    opt_g = adg.adam(gen_net.parameters(), 1e-4, (0.9, 0.99), device)
    opt_d = adg.adam(disc_net.parameters(), 1e-4, (0.9, 0.99), device)
    train, noise = ring.train.to(device), ring.train_noise.to(device)
    perms = torch.stack([torch.randperm(len(train), generator=g, device=device) for g in gens])
    alive = torch.ones(num_seeds, dtype=torch.bool, device=device)
    torch._dynamo.reset()
    train_step = torch.compile(adg.train_step) if args.compile else adg.train_step  # as the script's switch

    def step(k):  # full batches only (the epoch's last, smaller batch would time a recompilation)
        idx = perms[:, (k % (STEPS_PER_EPOCH - 1)) * 128:(k % (STEPS_PER_EPOCH - 1) + 1) * 128]
        return train_step(gen_net, disc_net, opt_g, opt_d, train[idx], noise[idx], alive, args.alpha_d,
                          args.alpha_g, False)

    r = harness.measure(step, args.steps, device)
    return {"seeds": num_seeds, **r, "seed_epochs_per_s": num_seeds * r["steps_per_s"] / STEPS_PER_EPOCH}


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

    r = harness.measure(step, args.steps, device)
    return {"seeds": "1 (plain loop, eager)", **r, "seed_epochs_per_s": r["steps_per_s"] / STEPS_PER_EPOCH}


COLUMNS = {"mode": "mode", "seeds": "seeds", "steps_per_s": "steps/s", "seed_epochs_per_s": "seed-epochs/s",
           "s_per_seed_epoch": "s per seed-epoch", "op_calls": "operator calls / step", "peak_mib": "peak MiB (CPU: process so far)",
           "warmup_s": "first 3 steps (s)"}

if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.matrix:
        print(harness.markdown(harness.run_matrix(__file__, sys.argv[1:]), COLUMNS))
        sys.exit()
    harness.setup(args.compile, args.matmul_precision, args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    ring = ring_data()
    mode = harness.mode_name(args.compile, args.matmul_precision)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, {mode}, {args.steps} timed "
          f"steps, α = ({args.alpha_d}, {args.alpha_g}), {args.layers} hidden layers, one epoch = {STEPS_PER_EPOCH} "
          "steps of 128", file=sys.stderr)
    rows = [bench_plain(args, ring, device)] if args.plain and not args.compile else []
    rows += [bench_stack(n, args, ring, device) for n in args.stacks]
    for r in rows:
        harness.emit({"mode": mode, **r, "s_per_seed_epoch": 1 / r["seed_epochs_per_s"]})
    print(harness.markdown([{"mode": mode, **r, "s_per_seed_epoch": 1 / r["seed_epochs_per_s"]} for r in rows], COLUMNS))
