"""Loop iterations per second of adaptive_wgan.py for each update strategy, on the current device.

    python benchmarks/bench_adaptive_wgan.py                                   # WGAN (clipping), DCGAN 64×64, paper width
    python benchmarks/bench_adaptive_wgan.py --loss wgan-gp                    # Gulrajani's 32×32 model, DIM 128
    OMP_NUM_THREADS=1 python benchmarks/bench_adaptive_wgan.py --loss wgan-gp --channels 1 --width 32 --iterations 60

One loop iteration = what the script's training loop does per batch: the decision, one critic OR generator step,
and (adaptive only, every iteration) the no-grad re-evaluation of both losses plus the host sync of the two numbers.
The baselines re-evaluate only on logging steps (every 100 iterations in the script); here they never do, so the
figures isolate the adaptive rule's extra cost. Random uint8 images stand in for data: the cost does not depend on
the pixels. Which network steps depends on the data for the adaptive rule, so its u_g/u_d split is printed too.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adaptive_wgan import AdaptiveRule, build_models, fixed_critic_turn, loop_iteration, make_optimizer  # noqa: E402
from common.datasets import Batches, to_float  # noqa: E402


@dataclass
class BenchArgs:
    loss: Literal["wgan-clip", "wgan-gp"] = "wgan-clip"
    """WGAN with weight clipping (DCGAN) or WGAN-GP (Gulrajani's model)"""
    strategies: tuple[str, ...] = ("fixed", "adaptive", "ttur")
    """strategies to time (fixed = 5:1, ttur = 1:1, adaptive with --lam)"""
    lam: float = 1.0
    """λ of the adaptive rule"""
    iterations: int = 100
    """timed loop iterations per strategy (after warm-up)"""
    warmup: int = 10
    """untimed iterations first"""
    batch_size: int = 64
    """batch size"""
    channels: int = 3
    """image channels (3: CIFAR-10, 1: MNIST)"""
    image_size: int | None = None
    """image size (None: 64 for wgan-clip, 32 for wgan-gp)"""
    width: int | None = None
    """network width (None: 64 for wgan-clip, 128 for wgan-gp)"""
    cuda: bool = True
    """use CUDA when available"""


def measure(bench: BenchArgs, strategy: str, device: torch.device) -> dict:
    clip = bench.loss == "wgan-clip"
    size, width = bench.image_size or (64 if clip else 32), bench.width or (64 if clip else 128)
    z_dim = 100 if clip else 128
    G, D = build_models(bench.loss, z_dim, width, bench.channels, size, seed=0, device=device)
    lr_g, lr_d = (1e-4, 3e-4) if strategy == "ttur" else (1e-4, 1e-4)
    opt_g, opt_d = make_optimizer(bench.loss, G.parameters(), lr_g, device), make_optimizer(bench.loss, D.parameters(), lr_d, device)
    gen = torch.Generator(device).manual_seed(0)
    images = torch.randint(0, 256, (2048, bench.channels, size, size), dtype=torch.uint8, device=device, generator=gen)
    batches = Batches(images, batch_size=bench.batch_size, generator=gen)
    rule, n_d, n_g = AdaptiveRule(bench.lam), *((1, 1) if strategy == "ttur" else (5, 1))
    counts = {"u_g": 0, "u_d": 0}

    def run(n, offset):
        for it in range(offset, offset + n):
            (x,) = batches.next()
            z = torch.randn(bench.batch_size, z_dim, device=device, generator=gen)
            alpha = torch.rand(bench.batch_size, 1, 1, 1, device=device, generator=gen)
            critic = rule.critic_turn() if strategy == "adaptive" else fixed_critic_turn(it, n_d, n_g)
            losses = loop_iteration(G, D, opt_g, opt_d, to_float(x), z, alpha, critic, bench.loss, 0.01, 10.0,
                                    evaluate=strategy == "adaptive")
            if strategy == "adaptive":
                rule.observe(*losses[:2].tolist())
            counts["u_d" if critic else "u_g"] += 1

    run(bench.warmup, 0)
    counts.update(u_g=0, u_d=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run(bench.iterations, bench.warmup)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return {"it_s": bench.iterations / seconds, "ms": 1000 * seconds / bench.iterations, "peak_mib": peak, **counts,
            "size": size, "width": width}


if __name__ == "__main__":
    bench = tyro.cli(BenchArgs)
    device = torch.device("cuda" if bench.cuda and torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"device: {name}; loss {bench.loss}, batch {bench.batch_size}, {bench.channels} channel(s), "
          f"{bench.iterations} timed iterations")
    for strategy in bench.strategies:
        r = measure(bench, strategy, device)
        print(f"{strategy:>9}: {r['it_s']:8.2f} loop iterations/s ({r['ms']:.1f} ms each), {r['size']}×{r['size']}, "
              f"width {r['width']}, u_g {r['u_g']}, u_d {r['u_d']}, peak GPU memory {r['peak_mib']:.0f} MiB")
