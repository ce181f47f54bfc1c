"""Training iterations per second of tempered_lens.py with and without the lens, with operator calls per
iteration and peak memory, in one mode (--compile, --matmul-precision) or in all four (--matrix: eager /
compiled × highest / medium, each in a fresh process).

    python benchmarks/bench_tempered_lens.py                                  # nsgan, paper widths
    python benchmarks/bench_tempered_lens.py --matrix --threads 2 --preset cpu-mini --steps 20
    python benchmarks/bench_tempered_lens.py --preset cifar10-wgan-gp --channels 3 --steps 5 --warmup 1

One iteration = what one generator iteration of the script's training loop does: --n-critic D steps, one G step
(D frozen), one lens step, with G, D and the lens compiled under --compile as the script compiles them (WGAN-GP's
penalty through the uncompiled D). Random data in [-1, 1] stands in for images: the cost does not depend on the
pixels. The settings come from a preset of the script (widths, batch size, critic steps, optimiser).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402
from tempered_lens import (PRESETS, build_models, discriminator_step, generator_loss, lens_step,  # noqa: E402
                           make_optimizer)


@dataclass
class BenchArgs:
    preset: Literal[tuple(PRESETS)] = "default"  # type: ignore[valid-type]
    """tempered_lens.py preset whose network and training settings are timed"""
    steps: int = 20
    """timed iterations per configuration (after the warm-up and the profiled iteration)"""
    warmup: int = 3
    """untimed iterations first (compiles happen here)"""
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
    compile: bool = False
    """torch.compile G, D and the lens (as tempered_lens.py --compile)"""
    matmul_precision: Literal["highest", "high", "medium"] = "highest"
    """float32 matmul precision of training (as tempered_lens.py --matmul-precision)"""
    threads: int = 0
    """torch threads (0 = torch's default)"""
    matrix: bool = False
    """run all four modes (eager / compiled × highest / medium), each in a fresh process, and print one table"""


def bench_config(bench: BenchArgs, use_lens: bool, device: torch.device) -> dict:
    args = PRESETS[bench.preset]
    args = replace(args, batch_size=bench.batch_size or args.batch_size, width=bench.width or args.width,
                   lens_width=bench.lens_width or args.lens_width)
    G, D, lens = build_models(args, bench.channels, seed=0, use_lens=use_lens, device=device)
    g_opt, d_opt, lens_opt = (None if m is None else make_optimizer(m, args, device) for m in (G, D, lens))
    torch._dynamo.reset()
    fast_G, fast_D, fast_lens = (torch.compile(m) if bench.compile and m is not None else m for m in (G, D, lens))
    gen = torch.Generator(device).manual_seed(0)
    data = torch.rand(4 * args.batch_size, bench.channels, 32, 32, device=device, generator=gen) * 2 - 1

    def step(k):  # the same three updates as the script's loop
        for _ in range(args.n_critic):
            real = data[torch.randint(len(data), (args.batch_size,), device=device, generator=gen)]
            z = torch.randn(args.batch_size, args.z_dim, device=device, generator=gen)
            discriminator_step(fast_D, fast_G, fast_lens, d_opt, real, z, args.gan, args.gp_weight, gen)
        D.requires_grad_(False)
        z = torch.randn(args.batch_size, args.z_dim, device=device, generator=gen)
        g_loss = generator_loss(args.gan, fast_D(fast_G(z)))
        g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        g_opt.step()
        D.requires_grad_(True)
        if lens is not None:
            lens_step(fast_lens, fast_D, lens_opt, real, 1.0, args.gan, args.reconstruction)

    r = harness.measure(step, bench.steps, device, warmup=bench.warmup)
    return {"lens": "with" if use_lens else "without", **r, "s_per_iteration": 1 / r["steps_per_s"]}


COLUMNS = {"mode": "mode", "lens": "lens", "steps_per_s": "iterations/s", "s_per_iteration": "s per iteration",
           "op_calls": "operator calls / iteration", "optimizer_op_calls": "of which optimizer", "peak_mib": "peak MiB (CPU: process so far)",
           "warmup_s": "warm-up (s)"}

if __name__ == "__main__":
    bench = tyro.cli(BenchArgs)
    if bench.matrix:
        rows = harness.run_matrix(__file__, sys.argv[1:])
        print(harness.markdown(rows, COLUMNS))
        sys.exit()
    harness.setup(bench.compile, bench.matmul_precision, bench.threads)
    device = torch.device("cuda" if bench.cuda and torch.cuda.is_available() else "cpu")
    mode = harness.mode_name(bench.compile, bench.matmul_precision)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, {mode}, {bench}",
          file=sys.stderr)
    rows = [{"mode": mode, **bench_config(bench, use_lens, device)} for use_lens in (False, True)]
    for r in rows:
        harness.emit(r)
    print(harness.markdown(rows, COLUMNS))
    print(f"lens overhead: {rows[1]['s_per_iteration'] / rows[0]['s_per_iteration']:.2f}× time per iteration")
