"""Cost of one SQD monitor call next to one training step of sqd_monitor.py, and the check that the digit quality
model ranks real > degraded > noise and constant images.

A monitor call = generate the fixed samples (max(num_quality, num_diversity)), one pass of the quality/mode model
over them (Q on num_quality, D on num_diversity) and the two weight angles. A training step = one D step (with the
chosen regulariser) and one G step at the given batch size, as in sqd_monitor.train(), G and D compiled under
--compile as the script compiles them; --matrix times it in the four modes eager / compiled × highest / medium.

    OMP_NUM_THREADS=1 python benchmarks/bench_sqd_monitor.py                    # CPU, fake digits (no files needed)
    python benchmarks/bench_sqd_monitor.py --matrix --threads 2 --no-monitor --image-sizes 28 --widths 16 64
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
import harness  # noqa: E402
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
    """timed training steps (after 3 warm-up ones and a profiled one)"""
    repeats: int = 3
    """timed monitor calls (after one warm-up call)"""
    quality: bool = False
    """instead of timing: Q of held-out real test images, degraded ones and non-digits (the ranking check)"""
    monitor: bool = True
    """also time one monitor call per size (eager, full precision, whatever the mode)"""
    cuda: bool = True
    """use CUDA when available"""
    compile: bool = False
    """torch.compile G and D of the training step (as sqd_monitor.py --compile)"""
    matmul_precision: Literal["highest", "high", "medium"] = "highest"
    """float32 matmul precision of the training step (as sqd_monitor.py --matmul-precision)"""
    threads: int = 0
    """torch threads (0 = torch's default)"""
    matrix: bool = False
    """time the training step in all four modes (eager / compiled × highest / medium), each in a fresh process"""


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


def bench_size(bench: BenchArgs, size: int, width: int, root: str, device) -> dict:
    args = sqd.Args(dataset=bench.dataset, data_root=root, image_size=size, width=width, cuda=bench.cuda,
                    batch_size=bench.batch_size, num_quality=bench.num_quality, num_diversity=bench.num_diversity)
    judge, num_modes, _, real = sqd.digit_models(args, device)
    G, D = sqd.build_models(args, real.shape[1], device)
    g_opt, d_opt = (torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.5, 0.999), fused=device.type == "cuda")
                    for m in (G, D))
    torch._dynamo.reset()
    fast_G, fast_D = (torch.compile(m) if bench.compile else m for m in (G, D))  # as sqd_monitor.py --compile
    x, gen = real[torch.arange(bench.batch_size) % len(real)].to(device), torch.Generator(device).manual_seed(0)

    def step(k):  # the body of sqd_monitor.train()'s loop
        fake = fast_G(torch.randn(len(x), args.z_dim, device=device, generator=gen))
        d_loss = sqd.discriminator_loss("nsgan", fast_D(x), fast_D(fake.detach()))
        if bench.regularizer != "none":  # through the uncompiled D, as in the script
            points = sqd.penalty_points(bench.regularizer, x, fake.detach(), args.dragan_c, gen)
            d_loss = d_loss + args.gp_weight * sqd.gradient_penalty(bench.regularizer, D, points)[0]
        d_opt.zero_grad(set_to_none=True), d_loss.backward(), d_opt.step()
        g_loss = sqd.generator_loss("nsgan", fast_D(fake))
        g_opt.zero_grad(set_to_none=True), g_loss.backward(inputs=list(G.parameters())), g_opt.step()

    r = harness.measure(step, bench.iterations, device)
    row = {"size": size, "width": width, **r, "ms_per_step": 1e3 / r["steps_per_s"],
           "params_M": (sum(p.numel() for p in G.parameters()) + sum(p.numel() for p in D.parameters())) / 1e6}
    if bench.monitor:  # one monitor call: eager G, full precision (as in the script)
        monitor = sqd.SQDMonitor(judge, num_modes, bench.num_quality, bench.num_diversity)
        noise = torch.randn(max(bench.num_quality, bench.num_diversity), args.z_dim, device=device)
        weights = {"G": sqd.weight_matrices(G), "D": sqd.weight_matrices(D)}
        call = lambda: monitor(sqd.generate(G, noise), **weights)  # noqa: E731
        call()
        per_call = statistics.median(timed(call, device) for _ in range(bench.repeats))
        generating = statistics.median(timed(lambda: sqd.generate(G, noise), device) for _ in range(bench.repeats))
        steps = 60_000 // bench.batch_size  # one MNIST epoch
        row.update(monitor_ms=1e3 * per_call, generating_ms=1e3 * generating, monitor_in_steps=per_call / (row["ms_per_step"] / 1e3),
                   monitor_share_per_mnist_epoch=per_call / (per_call + steps * row["ms_per_step"] / 1e3))
    return row


COLUMNS = {"mode": "mode", "size": "size", "width": "width", "params_M": "G + D params (M)",
           "ms_per_step": "ms per step", "op_calls": "operator calls / step", "optimizer_op_calls": "of which optimizer",
           "peak_mib": "peak MiB (CPU: process so far)", "monitor_ms": "monitor call (ms)",
           "generating_ms": "of which generating (ms)", "monitor_in_steps": "monitor call in steps",
           "monitor_share_per_mnist_epoch": "share at one call per MNIST epoch"}


def main(bench: BenchArgs) -> None:
    if bench.matrix:
        return print(harness.markdown(harness.run_matrix(__file__, sys.argv[1:]), COLUMNS))
    harness.setup(bench.compile, bench.matmul_precision, bench.threads)
    device = torch.device("cuda" if bench.cuda and torch.cuda.is_available() else "cpu")
    root = bench.data_root or tempfile.mkdtemp(prefix="sqd_bench_")
    if bench.quality:
        return quality_check(bench, root, device)
    mode = harness.mode_name(bench.compile, bench.matmul_precision)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, {mode}, dataset "
          f"{bench.dataset}, batch {bench.batch_size}, step with {bench.regularizer}, Q on {bench.num_quality}, D on "
          f"{bench.num_diversity} samples", file=sys.stderr)
    rows = [{"mode": mode, **bench_size(bench, size, width, root, device)}
            for size in bench.image_sizes for width in bench.widths]
    for r in rows:
        harness.emit(r)
    print(harness.markdown(rows, COLUMNS))


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
