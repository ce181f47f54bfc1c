"""Loop iterations per second of adaptive_wgan.py's training loop, for the fixed schedule and for the adaptive rule,
with operator calls per loop iteration and peak memory, in one mode (--compile, --matmul-precision) or in all four
(--matrix: eager / compiled × highest / medium, each in a fresh process).

    python benchmarks/bench_adaptive_wgan.py                                   # WGAN (clipping), DCGAN 64×64, paper width
    python benchmarks/bench_adaptive_wgan.py --matrix --threads 2 --loss wgan-gp --channels 1 --width 16   # cpu-mini model
    python benchmarks/bench_adaptive_wgan.py --loss r1                         # Gulrajani's 32×32 model, DIM 128

One loop iteration = what the script does per batch: one critic OR one generator step. Two cycles are timed, each
made of the script's own calls (`gan_losses`, `generator_loss`, `evaluate_losses`, clipping) on random uint8
images converted per batch as in the script, G and D compiled under --compile as the script compiles them:
- fixed: n_d critic steps then one generator step (n_d + 1 loop iterations; the re-evaluation of the losses, every
  100 iterations in the script, is left out);
- adaptive: one critic and one generator step, each followed by the re-evaluation of both losses with the new
  weights and its host sync (2 loop iterations at a 1:1 mix; the rule's real mix depends on the run, and a
  penalised critic step costs more than a generator step).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adaptive_wgan as aw  # noqa: E402
import harness  # noqa: E402
from common.datasets import to_float  # noqa: E402


@dataclass
class BenchArgs:
    loss: Literal["wgan-clip", "wgan-gp", "r1"] = "wgan-clip"
    """WGAN with weight clipping (DCGAN 64×64, z 100), WGAN-GP or R1 (Gulrajani's 32×32 model, z 128)"""
    steps: int = 10
    """timed cycles per schedule (after the warm-up and the profiled cycle)"""
    warmup: int = 3
    """untimed cycles first (compiles happen here)"""
    batch_size: int = 64
    """batch size (the paper: 64)"""
    channels: int = 3
    """image channels (3: CIFAR-10, 1: MNIST)"""
    width: int = 0
    """network width (0: 64 for wgan-clip, 128 for wgan-gp and r1)"""
    n_critic: int = 5
    """critic steps per generator step of the fixed schedule (R1's is 1 in the paper's Table 4)"""
    cuda: bool = True
    """use CUDA when available"""
    compile: bool = False
    """torch.compile G and D (as adaptive_wgan.py --compile)"""
    matmul_precision: Literal["highest", "high", "medium"] = "highest"
    """float32 matmul precision of training (as adaptive_wgan.py --matmul-precision)"""
    threads: int = 0
    """torch threads (0 = torch's default)"""
    matrix: bool = False
    """run all four modes (eager / compiled × highest / medium), each in a fresh process, and print one table"""


def bench_schedule(bench: BenchArgs, schedule: str, device: torch.device) -> dict:
    clip = bench.loss == "wgan-clip"
    size, z_dim, width = (64, 100, bench.width or 64) if clip else (32, 128, bench.width or 128)
    G, D = aw.build_models(bench.loss, z_dim, width, bench.channels, size, 1, 0.01, device)
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), 1e-4, betas=(0.5, 0.9), fused=device.type == "cuda")
                    if bench.loss == "wgan-gp" else torch.optim.RMSprop(m.parameters(), 5e-5) for m in (G, D))
    torch._dynamo.reset()
    fast_G, fast_D = (torch.compile(m) if bench.compile else m for m in (G, D))
    gen = torch.Generator(device).manual_seed(0)
    images = torch.randint(0, 256, (8 * bench.batch_size, bench.channels, size, size), dtype=torch.uint8,
                           device=device, generator=gen)

    def iteration(critic: bool, evaluate: bool):  # the body of the script's loop, one batch
        real = to_float(images[torch.randint(len(images), (bench.batch_size,), device=device, generator=gen)])
        z = torch.randn(bench.batch_size, z_dim, device=device, generator=gen)
        alpha = torch.rand(bench.batch_size, 1, 1, 1, device=device, generator=gen)
        if critic:
            with torch.no_grad():
                fake = fast_G(z)
            opt_d.zero_grad(set_to_none=True)
            aw.gan_losses(fast_D, real, fake, alpha, bench.loss, 10.0)[1].backward()
            opt_d.step()
            aw.clip_weights(D, 0.01) if clip else None
        else:
            fake = None
            opt_g.zero_grad(set_to_none=True)
            aw.generator_loss(fast_D(fast_G(z)), bench.loss).backward(inputs=list(G.parameters()))
            opt_g.step()
        if evaluate:
            aw.evaluate_losses(fast_G, fast_D, real, z, alpha, bench.loss, 10.0, fake).tolist()

    if schedule == "fixed":
        turns, evaluate = [True] * bench.n_critic + [False], False
    else:
        turns, evaluate = [True, False], True

    def cycle(k):
        for critic in turns:
            iteration(critic, evaluate)

    r = harness.measure(cycle, bench.steps, device, warmup=bench.warmup)
    n = len(turns)
    return {"schedule": f"fixed {bench.n_critic}:1" if schedule == "fixed" else "adaptive (1:1 mix, re-evaluated)",
            **r, "loop_iterations_per_s": n * r["steps_per_s"], "op_calls_per_iteration": r["op_calls"] / n,
            "optimizer_op_calls_per_iteration": r["optimizer_op_calls"] / n, "size": size, "width": width}


COLUMNS = {"mode": "mode", "schedule": "schedule", "loop_iterations_per_s": "loop iterations/s",
           "op_calls_per_iteration": "operator calls / iteration",
           "optimizer_op_calls_per_iteration": "of which optimizer", "peak_mib": "peak MiB (CPU: process so far)",
           "warmup_s": "warm-up (s)"}

if __name__ == "__main__":
    bench = tyro.cli(BenchArgs)
    if bench.matrix:
        print(harness.markdown(harness.run_matrix(__file__, sys.argv[1:]), COLUMNS))
        sys.exit()
    harness.setup(bench.compile, bench.matmul_precision, bench.threads)
    device = torch.device("cuda" if bench.cuda and torch.cuda.is_available() else "cpu")
    mode = harness.mode_name(bench.compile, bench.matmul_precision)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, {mode}, {bench}",
          file=sys.stderr)
    rows = [{"mode": mode, **bench_schedule(bench, schedule, device)} for schedule in ("fixed", "adaptive")]
    for r in rows:
        harness.emit(r)
    print(harness.markdown(rows, COLUMNS))
