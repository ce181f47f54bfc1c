"""Loop iterations per second of adaptive_wgan.py's training loop for each update strategy, on the current device.

    python benchmarks/bench_adaptive_wgan.py                                   # WGAN (clipping), DCGAN 64×64, paper width
    python benchmarks/bench_adaptive_wgan.py --loss wgan-gp                    # Gulrajani's 32×32 model, DIM 128
    python benchmarks/bench_adaptive_wgan.py --loss r1 --channels 1 --width 16 --iterations 200   # the cpu-mini model

It runs the script's own `train` (one configuration per call, no metrics, no checkpoints) on random uint8 images
of one epoch, after an untimed warm-up run. One loop iteration = what the script does per batch: the decision, one
critic OR generator step, and (adaptive every iteration, the baselines every 100) the no-grad re-evaluation of both
losses. Which network steps depends on the data for the adaptive rule, so its u_g/u_d split is printed too; a
WGAN-GP or R1 critic step (the penalty's double backward) costs more than a generator step, so compare rows at
similar mixes.
"""
from __future__ import annotations

import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adaptive_wgan as aw  # noqa: E402


@dataclass
class BenchArgs:
    loss: Literal["wgan-clip", "wgan-gp", "r1"] = "wgan-clip"
    """WGAN with weight clipping (DCGAN), WGAN-GP or R1 (Gulrajani's model)"""
    strategies: tuple[Literal["fixed", "ttur", "adaptive"], ...] = ("fixed", "adaptive", "ttur")
    """strategies to time (fixed = 5:1 or R1's 1:1, ttur = 1:1, adaptive with --lam)"""
    lam: float = 1.0
    """λ of the adaptive rule"""
    iterations: int = 100
    """timed loop iterations per strategy"""
    warmup: int = 10
    """untimed iterations first (a separate short run)"""
    batch_size: int = 64
    """batch size"""
    channels: int = 3
    """image channels (3: CIFAR-10, 1: MNIST)"""
    width: int = 0
    """network width (0: 64 for wgan-clip, 128 for wgan-gp and r1)"""
    matmul_precision: Literal["highest", "high", "medium"] = "highest"
    """float32 matmul precision of the timed loop"""
    cuda: bool = True
    """use CUDA when available"""


def measure(bench: BenchArgs, strategy: str, device: torch.device) -> dict:
    clip = bench.loss == "wgan-clip"
    preset = aw.PRESETS["default" if clip else "table4"]
    args = replace(preset, losses=[bench.loss], strategies=[strategy], lams=[bench.lam], batch_size=bench.batch_size,
                   width=bench.width or preset.width, fid_every=0, save_model=False)
    cfg = aw.configurations(args)[0]
    gen = torch.Generator().manual_seed(0)
    results = {}
    for phase, n in (("warmup", bench.warmup), ("timed", bench.iterations)):
        images = torch.randint(0, 256, (n * bench.batch_size, bench.channels, args.image_size, args.image_size),
                               dtype=torch.uint8, generator=gen).to(device)
        with tempfile.TemporaryDirectory() as folder:
            run_args = replace(args, epochs=1)  # one epoch = n loop iterations
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            result = aw.train(run_args, cfg, images, None, Path(folder), device, threading.Event(),
                              {"args": asdict(run_args)})
            if device.type == "cuda":
                torch.cuda.synchronize()
            results[phase] = (time.perf_counter() - start, result)
    seconds, result = results["timed"]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return {"it_s": bench.iterations / seconds, "ms": 1000 * seconds / bench.iterations, "peak_mib": peak,
            "u_g": result["u_g"], "u_d": result["u_d"], "size": args.image_size, "width": args.width}


if __name__ == "__main__":
    bench = tyro.cli(BenchArgs)
    device = torch.device("cuda" if bench.cuda and torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision(bench.matmul_precision)
    torch.backends.cudnn.allow_tf32 = bench.matmul_precision != "highest"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"device: {name}; loss {bench.loss}, batch {bench.batch_size}, {bench.channels} channel(s), "
          f"{bench.iterations} timed iterations, matmul precision {bench.matmul_precision}")
    for strategy in bench.strategies:
        r = measure(bench, strategy, device)
        print(f"{strategy:>9}: {r['it_s']:8.2f} loop iterations/s ({r['ms']:.1f} ms each, sample grid included), "
              f"{r['size']}×{r['size']}, width {r['width']}, u_g {r['u_g']}, u_d {r['u_d']}, "
              f"peak GPU memory {r['peak_mib']:.0f} MiB")
