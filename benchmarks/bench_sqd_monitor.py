"""Cost of one SQD monitor call next to one training iteration of sqd_monitor.py.

A monitor call = generate the fixed samples (max(num_quality, num_diversity)) + Q on num_quality of them + D on
num_diversity of them + the two weight angles. A training iteration = one D step (with the chosen regulariser)
and one G step at the given batch size. Prints one line per configuration, and the monitor's share of an epoch
when it is called once per epoch.

    OMP_NUM_THREADS=1 python benchmarks/bench_sqd_monitor.py                    # CPU, fake digits (no files needed)
    python benchmarks/bench_sqd_monitor.py --dataset mnist --image-sizes 28 64   # real MNIST classifier, GPU if present
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sqd_monitor as sqd  # noqa: E402


@dataclass
class BenchArgs:
    dataset: Literal["fake", "mnist", "stacked-mnist", "ring"] = "fake"
    """data whose quality/mode models are timed (fake: a digit classifier trained on synthetic data in a temp folder)"""
    data_root: str | None = None
    """data root (None: a temporary folder, fine for fake/ring)"""
    image_sizes: tuple[int, ...] = (28, 64)
    """image sides to time"""
    widths: tuple[int, ...] = (16, 64)
    """network widths to time (64 = DCGAN)"""
    regularizer: Literal["none", "gp", "dragan", "zero-gp", "lipschitz"] = "gp"
    """regulariser of the timed training iteration"""
    batch_size: int = 128
    """training batch size"""
    num_quality: int = 1000
    """samples for Q"""
    num_diversity: int = 2000
    """samples for D"""
    iterations: int = 20
    """timed training iterations (after 3 warm-up ones)"""
    repeats: int = 3
    """timed monitor calls (after one warm-up call)"""
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


def main(bench: BenchArgs) -> None:
    device = torch.device("cuda" if bench.cuda and torch.cuda.is_available() else "cpu")
    root = bench.data_root or tempfile.mkdtemp(prefix="sqd_bench_")
    print(f"device {device} | torch threads {torch.get_num_threads()} | dataset {bench.dataset} | "
          f"batch {bench.batch_size} | Q on {bench.num_quality}, D on {bench.num_diversity} samples")
    sizes = (None,) if bench.dataset == "ring" else bench.image_sizes
    for size in sizes:
        for width in bench.widths:
            args = sqd.Args(dataset=bench.dataset, data_root=root, image_size=size, width=width,
                            batch_size=bench.batch_size, num_quality=bench.num_quality,
                            num_diversity=bench.num_diversity, num_train=max(bench.batch_size, 512), cuda=bench.cuda)
            real, (quality, modes, num_modes, _), _ = sqd.prepare_data_and_models(args, device)
            G, D = sqd.build_models(args, real.shape[1] if real.dim() == 4 else 2, device)
            opts = [torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.5, 0.999)) for m in (G, D)]
            x = real[:bench.batch_size]
            if len(x) < bench.batch_size:
                x = x.repeat((bench.batch_size + len(x) - 1) // len(x), *([1] * (x.dim() - 1)))[:bench.batch_size]
            step = lambda: sqd.train_iteration(G, D, *opts, x, "nsgan", bench.regularizer, args)  # noqa: E731
            for _ in range(3):
                step()
            iteration = statistics.median(timed(step, device) for _ in range(bench.iterations))
            monitor = sqd.SQDMonitor(quality, modes, num_modes, bench.num_quality, bench.num_diversity)
            noise = torch.randn(max(bench.num_quality, bench.num_diversity), args.z_dim, device=device)
            call = lambda: monitor(sqd.generate(G, noise), G=G.parameters(), D=D.parameters())  # noqa: E731
            call()
            per_call = statistics.median(timed(call, device) for _ in range(bench.repeats))
            angles = statistics.median(timed(lambda: monitor.stability(G=G.parameters(), D=D.parameters()), device)
                                       for _ in range(bench.repeats))
            gen = statistics.median(timed(lambda: sqd.generate(G, noise), device) for _ in range(bench.repeats))
            params = sum(p.numel() for p in G.parameters()) + sum(p.numel() for p in D.parameters())
            mnist_epoch = 60_000 // bench.batch_size
            print(f"size {size} width {width:3d} ({params / 1e6:.2f}M params): iteration ({bench.regularizer}) "
                  f"{iteration * 1e3:8.1f} ms | monitor call {per_call * 1e3:8.1f} ms "
                  f"(generate {gen * 1e3:.1f}, angles {angles * 1e3:.1f}) = {per_call / iteration:5.1f} iterations "
                  f"| once per MNIST epoch ({mnist_epoch} it): {100 * per_call / (per_call + mnist_epoch * iteration):.1f}%")


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
