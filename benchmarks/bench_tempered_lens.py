"""Training iterations per second of tempered_lens.py with and without the lens, on the current device.

    python benchmarks/bench_tempered_lens.py                                  # nsgan, paper widths
    python benchmarks/bench_tempered_lens.py --gan wgan-gp --steps 20
    OMP_NUM_THREADS=1 python benchmarks/bench_tempered_lens.py --width 32 --lens-width 16 --steps 30   # CPU setting of the docs

One iteration = what one generator iteration of the script does (D step(s), G step, lens step). Random data
in [-1, 1] stands in for images: the cost does not depend on the pixels.
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
from tempered_lens import Args, build_models, make_optimizer, train_iteration  # noqa: E402


@dataclass
class BenchArgs:
    gan: Literal["nsgan", "lsgan", "wgan-gp"] = "nsgan"
    """GAN variant"""
    steps: int = 50
    """timed iterations per configuration (after warm-up)"""
    warmup: int = 5
    """untimed iterations first"""
    batch_size: int = 64
    """batch size"""
    channels: int = 1
    """image channels (1: MNIST, 3: the other datasets)"""
    width: int | None = None
    """G/D width C (None: the script's default for the variant)"""
    lens_width: int = 64
    """lens channels"""
    lens_blocks: int = 8
    """lens residual blocks"""
    cuda: bool = True
    """use CUDA when available"""


def measure(bench: BenchArgs, use_lens: bool, device: torch.device) -> tuple[float, float]:
    args = Args(gan=bench.gan, batch_size=bench.batch_size, width=bench.width, lens_width=bench.lens_width,
                lens_blocks=bench.lens_blocks, dataset="fake")
    G, D, lens = build_models(args, bench.channels, seed=0, use_lens=use_lens, device=device)
    g_opt, d_opt = make_optimizer(G.parameters(), args, device), make_optimizer(D.parameters(), args, device)
    lens_opt = make_optimizer(lens.parameters(), args, device) if use_lens else None
    gen = torch.Generator(device).manual_seed(0)
    real = torch.rand(4 * bench.batch_size, bench.channels, 32, 32, device=device, generator=gen) * 2 - 1

    def next_real():
        return real[torch.randint(len(real), (bench.batch_size,), device=device, generator=gen)]

    def next_noise():
        return torch.randn(bench.batch_size, args.z_dim, device=device, generator=gen)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(bench.warmup + bench.steps):
        if step == bench.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        stats = train_iteration(step, G, D, lens, g_opt, d_opt, lens_opt, next_real, next_noise, args)
    stats["g_loss"].item()  # wait for the device
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return bench.steps / elapsed, peak


if __name__ == "__main__":
    bench = tyro.cli(BenchArgs)
    device = torch.device("cuda" if bench.cuda and torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    print(f"device {device}, threads {torch.get_num_threads()}, {bench}")
    results = {}
    for use_lens in (False, True):
        its, peak = measure(bench, use_lens, device)
        results[use_lens] = its
        print(f"{'with' if use_lens else 'without'} lens: {its:.2f} it/s" +
              (f", peak memory {peak:.0f} MiB" if device.type == "cuda" else ""))
    print(f"lens overhead: {results[False] / results[True]:.2f}x time per iteration")
