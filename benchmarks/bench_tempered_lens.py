"""Training iterations per second of tempered_lens.py with and without the lens, on the current device.

    python benchmarks/bench_tempered_lens.py                                  # nsgan, paper widths
    python benchmarks/bench_tempered_lens.py --preset cifar10-wgan-gp --channels 3 --steps 5 --warmup 1
    OMP_NUM_THREADS=1 python benchmarks/bench_tempered_lens.py --preset cpu-mini --steps 20 --warmup 3

One iteration = what one generator iteration of the script's training loop does: --n-critic D steps, one G step
(D frozen), one lens step. Random data in [-1, 1] stands in for images: the cost does not depend on the pixels.
The settings come from a preset of the script (widths, batch size, critic steps, optimiser).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tempered_lens import (PRESETS, build_models, discriminator_step, generator_loss, lens_step,  # noqa: E402
                           make_optimizer)


@dataclass
class BenchArgs:
    preset: Literal[tuple(PRESETS)] = "default"  # type: ignore[valid-type]
    """tempered_lens.py preset whose network and training settings are timed"""
    steps: int = 50
    """timed iterations per configuration (after warm-up)"""
    warmup: int = 5
    """untimed iterations first"""
    channels: int = 1
    """image channels (1: MNIST, 3: the other datasets)"""
    batch_size: int = 0
    """batch size (0: the preset's)"""
    width: int = 0
    """G/D width C (0: the preset's)"""
    lens_width: int = 0
    """lens channels (0: the preset's)"""
    cuda: bool = True
    """use CUDA when available"""


def measure(bench: BenchArgs, use_lens: bool, device: torch.device) -> tuple[float, float]:
    args = PRESETS[bench.preset]
    args = replace(args, batch_size=bench.batch_size or args.batch_size, width=bench.width or args.width,
                   lens_width=bench.lens_width or args.lens_width)
    G, D, lens = build_models(args, bench.channels, seed=0, use_lens=use_lens, device=device)
    g_opt, d_opt, lens_opt = (None if m is None else make_optimizer(m, args, device) for m in (G, D, lens))
    gen = torch.Generator(device).manual_seed(0)
    data = torch.rand(4 * args.batch_size, bench.channels, 32, 32, device=device, generator=gen) * 2 - 1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(bench.warmup + bench.steps):
        if step == bench.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        for _ in range(args.n_critic):  # the same three updates as the script's loop
            real = data[torch.randint(len(data), (args.batch_size,), device=device, generator=gen)]
            z = torch.randn(args.batch_size, args.z_dim, device=device, generator=gen)
            discriminator_step(D, G, lens, d_opt, real, z, args.gan, args.gp_weight, gen)
        D.requires_grad_(False)
        g_loss = generator_loss(args.gan, D(G(torch.randn(args.batch_size, args.z_dim, device=device, generator=gen))))
        g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        g_opt.step()
        D.requires_grad_(True)
        if lens is not None:
            lens_step(lens, D, lens_opt, real, 1.0, args.gan, args.reconstruction)
    g_loss.item()  # wait for the device
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
