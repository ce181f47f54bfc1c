"""Cost of one SQD monitor call next to one training step of sqd_monitor.py, and the check that the digit quality
model ranks real > degraded > noise and constant images.

A monitor call = generate the fixed samples (max(num_quality, num_diversity)), one pass of the quality/mode model
over them (Q on num_quality, D on num_diversity) and the two weight angles. A training step = one D step (with the
chosen regulariser) and one G step at the given batch size, as in sqd_monitor.train().

    OMP_NUM_THREADS=1 python benchmarks/bench_sqd_monitor.py                    # CPU, fake digits (no files needed)
    python benchmarks/bench_sqd_monitor.py --dataset mnist --image-sizes 28 64   # real MNIST, GPU if present
    python benchmarks/bench_sqd_monitor.py --quality --dataset mnist --image-sizes 28   # Q of real/degraded/noise
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sqd_monitor as sqd  # noqa: E402


@dataclass
class BenchArgs:
    dataset: Literal["fake", "mnist", "stacked-mnist"] = "fake"
    """data whose quality/mode model is timed (fake: trained on synthetic digits in a temporary folder)"""
    data_root: str = ""
    """data root ("" = a temporary folder, fine for fake)"""
    image_sizes: tuple[int, ...] = (28, 64)
    """image sides to time"""
    widths: tuple[int, ...] = (16, 64)
    """network widths to time (64 = DCGAN)"""
    regularizer: Literal["none", "gp", "dragan", "zero-gp", "lipschitz"] = "gp"
    """regulariser of the timed training step"""
    batch_size: int = 128
    """training batch size"""
    num_quality: int = 1000
    """samples for Q"""
    num_diversity: int = 2000
    """samples for D"""
    iterations: int = 20
    """timed training steps (after 3 warm-up ones)"""
    repeats: int = 3
    """timed monitor calls (after one warm-up call)"""
    quality: bool = False
    """instead of timing: Q of held-out real test images, degraded ones and non-digits (the ranking check)"""
    cuda: bool = True
    """use CUDA when available"""


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (9 taps, edges replicated) of N×C×H×W images."""
    k = torch.arange(-4, 5, dtype=x.dtype, device=x.device)
    w = torch.exp(-k ** 2 / (2 * sigma ** 2))
    w = (w / w.sum()).view(1, 1, 1, 9).repeat(x.shape[1], 1, 1, 1)
    x = F.conv2d(F.pad(x, (4, 4, 0, 0), mode="replicate"), w, groups=x.shape[1])
    return F.conv2d(F.pad(x, (0, 0, 4, 4), mode="replicate"), w.transpose(2, 3), groups=x.shape[1])


def degraded_sets(real: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Real images and their degradations (none of them in the reject class), uniform noise and constants."""
    g, side = torch.Generator().manual_seed(seed), real.shape[-1]
    noisy = lambda s: (real + s * torch.randn(real.shape, generator=g)).clamp(-1, 1)  # noqa: E731
    erased = lambda dim: torch.where(torch.arange(side).view(*([1] * dim), side, *([1] * (3 - dim))) >= side // 2,  # noqa: E731
                                     -1.0, real)
    return {"real (held out)": real, "blurred σ=1": blur(real, 1.0), "blurred σ=1.5": blur(real, 1.5),
            "blurred σ=2": blur(real, 2.0), "noisy σ=0.5": noisy(0.5), "noisy σ=0.75": noisy(0.75),
            "bottom half erased": erased(2), "right half erased": erased(3),
            "two digits averaged": (real + real.roll(1, 0)) / 2,
            "uniform noise": torch.rand(real.shape, generator=g) * 2 - 1,
            "Gaussian noise": torch.randn(real.shape, generator=g).clamp(-1, 1),
            "black": -torch.ones_like(real), "white": torch.ones_like(real), "grey": torch.zeros_like(real),
            "random constants": (torch.rand(len(real), 1, 1, 1, generator=g) * 2 - 1).expand_as(real).contiguous()}


def quality_check(bench: BenchArgs, root: str, device) -> None:
    for size in bench.image_sizes:
        args = sqd.Args(dataset=bench.dataset, data_root=root, image_size=size, cuda=bench.cuda)
        judge, _, name, real = sqd.digit_models(args, device)
        print(f"{bench.dataset} {size}×{size}: {name}\n| images ({len(real)}) | Q |\n|---|---|")
        with torch.no_grad():
            for label, x in degraded_sets(real).items():
                print(f"| {label} | {float(judge(x.to(device), len(x))[0].mean()):.3f} |")


def main(bench: BenchArgs) -> None:
    device = torch.device("cuda" if bench.cuda and torch.cuda.is_available() else "cpu")
    root = bench.data_root or tempfile.mkdtemp(prefix="sqd_bench_")
    if bench.quality:
        return quality_check(bench, root, device)
    print(f"device {device} | torch threads {torch.get_num_threads()} | dataset {bench.dataset} | "
          f"batch {bench.batch_size} | Q on {bench.num_quality}, D on {bench.num_diversity} samples")
    for size in bench.image_sizes:
        for width in bench.widths:
            args = sqd.Args(dataset=bench.dataset, data_root=root, image_size=size, width=width, cuda=bench.cuda,
                            batch_size=bench.batch_size, num_quality=bench.num_quality, num_diversity=bench.num_diversity)
            judge, num_modes, _, real = sqd.digit_models(args, device)
            G, D = sqd.build_models(args, real.shape[1], device)
            g_opt, d_opt = (torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.5, 0.999)) for m in (G, D))
            x = real[torch.arange(bench.batch_size) % len(real)].to(device)

            def step():  # the body of sqd_monitor.train()'s loop
                fake = G(torch.randn(len(x), args.z_dim, device=device))
                d_loss = sqd.discriminator_loss("nsgan", D(x), D(fake.detach()))
                if bench.regularizer != "none":
                    points = sqd.penalty_points(bench.regularizer, x, fake.detach(), args.dragan_c)
                    d_loss = d_loss + args.gp_weight * sqd.gradient_penalty(bench.regularizer, D, points)[0]
                d_opt.zero_grad(set_to_none=True), d_loss.backward(), d_opt.step()
                D.requires_grad_(False)
                g_loss = sqd.generator_loss("nsgan", D(fake))
                g_opt.zero_grad(set_to_none=True), g_loss.backward(), g_opt.step()
                D.requires_grad_(True)

            for _ in range(3):
                step()
            iteration = statistics.median(timed(step, device) for _ in range(bench.iterations))
            monitor = sqd.SQDMonitor(judge, num_modes, bench.num_quality, bench.num_diversity)
            noise = torch.randn(max(bench.num_quality, bench.num_diversity), args.z_dim, device=device)
            weights = {"G": sqd.weight_matrices(G), "D": sqd.weight_matrices(D)}
            call = lambda: monitor(sqd.generate(G, noise), **weights)  # noqa: E731
            call()
            per_call = statistics.median(timed(call, device) for _ in range(bench.repeats))
            gen = statistics.median(timed(lambda: sqd.generate(G, noise), device) for _ in range(bench.repeats))
            params = sum(p.numel() for p in G.parameters()) + sum(p.numel() for p in D.parameters())
            mnist_epoch = 60_000 // bench.batch_size
            print(f"size {size} width {width:3d} ({params / 1e6:.2f}M params): step ({bench.regularizer}) "
                  f"{iteration * 1e3:8.1f} ms | monitor call {per_call * 1e3:8.1f} ms (generating {gen * 1e3:.1f}) "
                  f"= {per_call / iteration:5.1f} steps | once per MNIST epoch ({mnist_epoch} steps): "
                  f"{100 * per_call / (per_call + mnist_epoch * iteration):.1f}%")


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
