"""wgan_optimizer_study.py: networks, gradient penalties, stacked optimisers, divergence, one cell of the stack
against plain PyTorch and against a transcription of the authors' training step, Table I, and the run lifecycle
(presets, run folders, bad flags, Ctrl-C, SIGKILL, --resume)."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import REPO, skip_if_medium_changed_nothing, skip_unless_medium_reduces_matmuls
import wgan_optimizer_study as wos
from wgan_optimizer_study import (PRESETS, Args, StackedOptimizer, critic, dropout_masks, generate, gradient_penalty,
                                  load_cell, make_critic, make_generator, parse_args, stack_params, summarize,
                                  train_iteration)

SCRIPT = "wgan_optimizer_study.py"
WIDTHS = [1024, 512, 256]
OPTIMS = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam}


# ---------------------------------------------------------------- networks and penalty

def test_parameter_counts_and_shapes():
    G, D = make_generator(), make_critic()
    assert sum(p.numel() for p in G.parameters()) == 1_493_520          # Table II
    assert sum(p.numel() for p in D.parameters()) == 1_460_225          # Table III
    g_params, d_params = stack_params(G, 3), stack_params(D, 3)
    assert sum(p.numel() for p in g_params) == 3 * 1_493_520
    assert sum(p.numel() for p in d_params) == 3 * 1_460_225
    z = torch.randn(3, 5, 128) * 10
    images = generate(g_params, z)
    assert images.shape == (3, 5, 784) and images.abs().max() <= 1
    assert critic(d_params, images, None).shape == (3, 5)
    D.eval()   # every cell of the stack computes what the plain module computes
    torch.testing.assert_close(critic(d_params, images, None)[1], D(images[1].view(5, 1, 28, 28)).squeeze(1))
    torch.testing.assert_close(images[2].view(5, 1, 28, 28), G(z[2]))


def test_load_cell_round_trip():
    params = stack_params(make_generator(), 2)
    with torch.no_grad():
        params[0][1].add_(1.0)
    other = load_cell(make_generator(), params, 1)
    z = torch.randn(4, 128)
    torch.testing.assert_close(other(z).flatten(1), generate(params, z.unsqueeze(0).expand(2, -1, -1))[1])


def test_dropout_masks_independent_per_cell():
    uniform = torch.rand(4, 64, 1792, generator=torch.Generator().manual_seed(0))
    masks = dropout_masks(uniform, 0.3, WIDTHS)
    assert [m.shape[-1] for m in masks] == WIDTHS
    kept = (masks[0] > 0).float()
    assert abs(kept.mean().item() - 0.7) < 0.01
    assert torch.allclose(masks[0][masks[0] > 0], torch.tensor(1 / 0.7))
    assert not torch.equal(kept[0], kept[1])                  # cells do not share a mask
    assert all(torch.equal(m, torch.ones_like(m)) for m in dropout_masks(uniform, 0.0, WIDTHS))


def finite_difference_penalty(D, x, per_pixel, h=1e-6):
    """The penalty from central finite differences of a float64 critic, one sample and pixel at a time."""
    terms = []
    for sample in x:
        basis = torch.eye(784, dtype=torch.float64) * h
        grad = (D(sample + basis) - D(sample - basis)).squeeze(-1) / (2 * h)     # 784 partial derivatives
        terms.append(((grad.abs() - 1) ** 2).mean() if per_pixel else (grad.norm() - 1) ** 2)
    return torch.stack(terms).mean()


@pytest.mark.parametrize("per_pixel", [False, True])
def test_gradient_penalty_matches_finite_differences(per_pixel):
    torch.manual_seed(0)
    d_params = stack_params(make_critic(0.0).double(), 2)
    with torch.no_grad():                                       # make the two cells differ
        d_params[0][1].mul_(3.0)
    x = torch.rand(2, 4, 784, dtype=torch.float64) * 2 - 1
    penalty = gradient_penalty(d_params, x, None, per_pixel)
    for cell in range(2):
        reference = finite_difference_penalty(load_cell(make_critic(0.0).double().eval(), d_params, cell),
                                              x[cell], per_pixel)
        torch.testing.assert_close(penalty[cell], reference, rtol=1e-6, atol=1e-9)
    other = gradient_penalty(d_params, x, None, not per_pixel)
    assert (other - penalty).abs().min() > 1e-3                # the two variants are different penalties
    (g,) = torch.autograd.grad(penalty.sum(), d_params[0])     # differentiable w.r.t. the critic (double backward)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


# ---------------------------------------------------------------- stacked optimisers and divergence

def test_stacked_optimizer_matches_torch_optim_step_for_step():
    torch.manual_seed(0)
    names, lrs = ["sgd", "rmsprop", "adam", "adam"], [1e-2, 1e-3, 1e-3, 1e-1]
    start = [torch.randn(len(names), *s) for s in [(5, 7), (1, 7)]]
    stacked = [p.clone() for p in start]
    opt = StackedOptimizer(stacked, names, lrs)
    singles = [[nn.Parameter(p[c].clone()) for p in start] for c in range(len(names))]
    torch_opts = [OPTIMS[n](params, lr=lr) for n, lr, params in zip(names, lrs, singles)]
    active = torch.ones(len(names), dtype=torch.bool)
    for step in range(6):
        grads = [torch.randn_like(p) * 10 ** (step % 3 - 1) for p in stacked]
        assert opt.step(grads, active).all()
        for c, params in enumerate(singles):
            for p, g in zip(params, grads):
                p.grad = g[c].clone()
            torch_opts[c].step()
            for p, mine in zip(params, stacked):
                if names[c] == "sgd":   # torch's add(alpha=) rounds once (fused multiply-add): ≤ 1 ulp apart
                    torch.testing.assert_close(mine[c], p.detach(), rtol=1e-6, atol=1e-8)
                else:                    # RMSprop and Adam: the same operations in the same order, bit for bit
                    assert torch.equal(mine[c], p.detach()), (c, step)


def test_non_finite_gradient_moment_or_weight_freezes_only_that_cell():
    """Cell 1: an inf gradient; cell 2: finite gradients whose SGD step overflows the weights; cell 3: a gradient
    whose square overflows Adam's second moment (the weights alone would stay finite); cell 4: inactive. Each
    keeps its weights bit for bit; cell 0 (Adam, ordinary gradients) moves."""
    torch.manual_seed(0)
    names, lrs = ["adam", "adam", "sgd", "adam", "adam"], [1e-3, 1e-3, 1e38, 1e-3, 1e-3]
    params = [torch.randn(5, 4, 3).transpose(1, 2), torch.randn(5, 1, 3)]   # a transposed layout, as stacked
    opt = StackedOptimizer(params, names, lrs)
    opt.step([torch.randn_like(p) for p in params], torch.ones(5, dtype=torch.bool))   # non-zero moments first
    before = [p.clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    grads[0][1, 0, 0] = float("inf")
    grads[1][2] = 1e3
    grads[0][3, 2, 1] = 1e30
    alive = opt.step(grads, torch.tensor([True, True, True, True, False]))
    assert alive.tolist() == [True, False, False, False, False]
    for old, new in zip(before, params):
        assert torch.equal(old[1:], new[1:]) and not torch.equal(old[0], new[0]) and torch.isfinite(new).all()
    assert not torch.isfinite(opt.exp_avg_sq[0][3]).all()       # what flagged cell 3


def test_divergence_in_training_freezes_the_cell_and_others_go_on():
    def run():
        args = Args(dataset="fake", batch_size=8, n_critic=1)
        torch.manual_seed(3)
        g_params, d_params = stack_params(make_generator(), 2), stack_params(make_critic(), 2)
        names, lrs = ["sgd", "adam"], [1e6, 1e-4]
        g_opt, d_opt = StackedOptimizer(g_params, names, lrs), StackedOptimizer(d_params, names, lrs)
        gen = torch.Generator().manual_seed(0)
        alive, history = torch.ones(2, dtype=torch.bool), []
        for _ in range(3):
            real = torch.rand(8, 784, generator=gen) * 2 - 1
            stats, alive = train_iteration(g_params, d_params, g_opt, d_opt, real, alive, args, gen)
            history.append(stats)
        return torch.stack(history), alive, g_params + d_params
    a, alive_a, params_a = run()
    b, _, _ = run()
    assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))   # same seed, same numbers
    assert alive_a.tolist() == [False, True]                    # SGD at lr 1e6 blew up, Adam at 1e-4 goes on
    assert torch.isfinite(a[:, :, 1]).all()
    assert all(torch.isfinite(p).all() for p in params_a)       # the diverged cell is frozen at finite weights


def run_iterations(step, iterations=2, **args_kw):
    """`iterations` generator iterations of an SGD (lr 1e-2) and an Adam (lr 1e-3) cell from seed 3; stats, params."""
    args = Args(dataset="fake", batch_size=8, n_critic=2, **args_kw)
    torch.manual_seed(3)
    g_params, d_params = stack_params(make_generator(), 2), stack_params(make_critic(), 2)
    g_opt, d_opt = (StackedOptimizer(p, ["sgd", "adam"], [1e-2, 1e-3]) for p in (g_params, d_params))
    gen, alive, history = torch.Generator().manual_seed(0), torch.ones(2, dtype=torch.bool), []
    for _ in range(iterations):
        real = torch.rand(8, 784, generator=gen) * 2 - 1
        stats, alive = train_iteration(g_params, d_params, g_opt, d_opt, real, alive, args, gen, step)
        history.append(stats)
    assert alive.all()
    return torch.stack(history), [p.detach() for p in g_params + d_params]


@pytest.mark.parametrize("penalty", ["per-sample", "per-pixel"])
def test_compiled_iteration_matches_eager(penalty):
    """--compile traces `iteration` (the penalty through torch.func). Inductor reorders float32 reductions, so stats
    may differ in the last bits; the SGD cell's weights move by −lr·gradient, so comparing them after two iterations
    (4 critic and 2 generator updates) compares the gradients themselves (to 1e-6 / lr = 1e-4). Adam turns a
    last-bit difference in a gradient near its ε (1e-8) into a visible part of a step (≈ lr = 1e-3): 10% of a step."""
    eager_stats, eager_params = run_iterations(wos.iteration, penalty=penalty)
    torch._dynamo.reset()
    compiled_stats, compiled_params = run_iterations(torch.compile(wos.iteration), penalty=penalty)
    torch.testing.assert_close(compiled_stats, eager_stats, rtol=1e-4, atol=1e-5)
    for x, y in zip(compiled_params, eager_params):
        torch.testing.assert_close(x[0], y[0], rtol=0, atol=1e-6)   # SGD
        torch.testing.assert_close(x[1], y[1], rtol=0, atol=1e-4)   # Adam


def test_medium_precision_training_stays_close():
    """--matmul-precision medium (bf16-backed float32 matmuls where the CPU has them: 8 significant bits, ~4e-3
    relative per product): two iterations agree with full float32 to 2% in every loss statistic."""
    skip_unless_medium_reduces_matmuls()
    highest, _ = run_iterations(wos.iteration)
    try:
        torch.set_float32_matmul_precision("medium")
        medium, _ = run_iterations(wos.iteration)
    finally:
        torch.set_float32_matmul_precision("highest")
    skip_if_medium_changed_nothing(highest, medium)
    torch.testing.assert_close(medium, highest, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- one cell of the stack, recomputed another way

def replay_draws(seed: int, num_cells: int, batch: int, n_critic: int, iterations: int, g_noise: str):
    """The random tensors train_iteration draws from a generator seeded with `seed`, in its order: per critic
    step the noise C×B×z and uniforms C×3B×1793 (dropout masks of real, fake and x̂, then ε in the last column);
    for the generator step the noise (unless it reuses the last critic step's) and uniforms C×B×1792."""
    gen, out = torch.Generator().manual_seed(seed), []
    draw = dict(generator=gen, dtype=torch.float64)
    for _ in range(iterations):
        critic_steps = [(torch.randn(num_cells, batch, 128, **draw), torch.rand(num_cells, 3 * batch, 1793, **draw))
                        for _ in range(n_critic)]
        z = torch.randn(num_cells, batch, 128, **draw) if g_noise == "fresh" else critic_steps[-1][0]
        out.append((critic_steps, (z, torch.rand(num_cells, batch, 1792, **draw))))
    return out


def train_stack(args, names, lrs, reals, seed=1):
    torch.manual_seed(0)
    g_params, d_params = stack_params(make_generator().double(), 3), stack_params(make_critic(args.dropout).double(), 3)
    g_opt, d_opt = StackedOptimizer(g_params, names, lrs), StackedOptimizer(d_params, names, lrs)
    alive, gen = torch.ones(3, dtype=torch.bool), torch.Generator().manual_seed(seed)
    for real in reals:
        _, alive = train_iteration(g_params, d_params, g_opt, d_opt, real, alive, args, gen)
    assert alive.all()
    return g_params + d_params


@pytest.mark.parametrize("g_noise", ["fresh", "last-critic"])
def test_stacked_cell_equals_that_cell_trained_alone(g_noise):
    """A 3-cell stack (SGD, RMSprop, Adam) for 2 generator iterations with dropout and the per-sample penalty;
    each cell is then retrained alone with nn.Linear layers, torch.optim and the penalty written as a per-sample
    loop, on the same random draws."""
    args = Args(dataset="fake", batch_size=3, n_critic=1, g_noise=g_noise)
    names, lrs = ["sgd", "rmsprop", "adam"], [1e-2, 1e-3, 1e-3]
    B = 3
    reals = [torch.rand(B, 784, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) * 2 - 1
             for i in range(2)]
    stacked = train_stack(args, names, lrs, reals)
    draws = replay_draws(1, 3, B, args.n_critic, len(reals), g_noise)
    for c, (name, lr) in enumerate(zip(names, lrs)):
        torch.manual_seed(0)
        G, D = make_generator().double(), make_critic(args.dropout).double()
        linears = [m for m in D if isinstance(m, nn.Linear)]
        g_opt, d_opt = OPTIMS[name](G.parameters(), lr=lr), OPTIMS[name](D.parameters(), lr=lr)

        def critic_fn(x, uniform):
            keep = [(u >= args.dropout).double() / (1 - args.dropout) for u in uniform.split(WIDTHS, -1)]
            for i, layer in enumerate(linears):
                x = layer(x)
                x = F.leaky_relu(x, 0.2) * keep[i] if i < 3 else x
            return x.squeeze(-1)

        for real, (critic_steps, (z_g, u_g)) in zip(reals, draws):
            for z, u in critic_steps:
                z, u = z[c], u[c]
                fake = G(z).flatten(1).detach()
                loss = critic_fn(fake, u[B:2 * B, :-1]).mean() - critic_fn(real, u[:B, :-1]).mean()
                for b in range(B):                              # per-sample gradient, one sample at a time
                    eps = u[2 * B + b, -1]
                    xb = (eps * real[b] + (1 - eps) * fake[b]).unsqueeze(0).requires_grad_(True)
                    (grad,) = torch.autograd.grad(critic_fn(xb, u[2 * B + b:2 * B + b + 1, :-1]).sum(), xb,
                                                  create_graph=True)
                    loss = loss + args.gp_weight * (grad.norm() - 1) ** 2 / B
                d_opt.zero_grad()
                loss.backward()
                d_opt.step()
            g_opt.zero_grad()
            (-critic_fn(G(z_g[c]).flatten(1), u_g[c]).mean()).backward()
            g_opt.step()
        for mine, ref in zip(stacked, stack_params(G, 1) + stack_params(D, 1)):
            torch.testing.assert_close(mine[c], ref[0].detach(), rtol=1e-7, atol=1e-9)


class AuthorsGenerator(nn.Module):
    """The authors' Generator (src/architectures.py), written out: fc 128 → 256 → 512 → 1024 → 784, LeakyReLU
    0.2, tanh, reshaped to B×1×28×28."""

    def __init__(self):
        super().__init__()
        self.fc = nn.ModuleList([nn.Linear(a, b) for a, b in [(128, 256), (256, 512), (512, 1024), (1024, 784)]])

    def forward(self, x):
        x = x.reshape(len(x), -1)
        for layer in self.fc[:-1]:
            x = F.leaky_relu(layer(x), 0.2)
        return torch.tanh(self.fc[-1](x)).reshape(-1, 1, 28, 28)


class AuthorsCritic(nn.Module):
    """The authors' Discriminator for the Wasserstein loss: fc 784 → 1024 → 512 → 256 → 1, LeakyReLU 0.2, no output
    activation (their dropout is left out here: its random stream cannot be matched)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.ModuleList([nn.Linear(a, b) for a, b in [(784, 1024), (1024, 512), (512, 256), (256, 1)]])

    def forward(self, x):
        x = x.reshape(len(x), -1)
        for layer in self.fc[:-1]:
            x = F.leaky_relu(layer(x), 0.2)
        return self.fc[-1](x)


def authors_penalty(netD, real, fake, alpha, lambda_reg=0.1):
    """src/training.py gradient_penalty: α per sample (B×1×1×1), x̂ = αx + (1 − α)fake, ∇ of D(x̂) with unit
    output gradients, its 2-norm over dim 1 (the channel axis of B×1×28×28), ((norm − 1)²).mean() × lambda_reg."""
    x_hat = (alpha * real + (1 - alpha) * fake).detach().requires_grad_(True)
    out = netD(x_hat)
    (grad,) = torch.autograd.grad(out, x_hat, grad_outputs=torch.ones_like(out), create_graph=True)
    return ((grad.norm(2, dim=1) - 1) ** 2).mean() * lambda_reg


def test_table1_cell_equals_the_authors_training_step():
    """--preset table1 (dropout off) against the authors' discriminator_step × 5 and generator_step transcribed from
    src/training.py: errD = −(mean D(x) − mean D(G(z))) + 10 · penalty (lambda_reg 0.1, per-pixel norm), the
    generator step on the last critic step's fake batch, optimisers as their init_optimizers builds them."""
    args = PRESETS["table1"]
    assert (args.penalty, args.gp_weight, args.g_noise, args.n_critic) == ("per-pixel", 1.0, "last-critic", 5)
    args = replace(args, dataset="fake", batch_size=4, dropout=0.0, n_critic=2)   # n_critic 2: "last" is not "first"
    names, lrs = ["sgd", "rmsprop", "adam"], [1e-2, 1e-3, 1e-3]
    reals = [torch.rand(4, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) * 2 - 1
             for i in range(1)]
    torch.manual_seed(0)
    netG, netD = AuthorsGenerator().double(), AuthorsCritic().double()
    initial = [(net, [p.detach().clone() for p in net.parameters()]) for net in (netG, netD)]
    stacked = [t.detach().expand(3, -1, -1).clone().requires_grad_(True) for net in (netG, netD)
               for layer in net.fc for t in (layer.weight.t(), layer.bias.view(1, -1))]
    g_params, d_params = stacked[:8], stacked[8:]
    g_opt, d_opt = StackedOptimizer(g_params, names, lrs), StackedOptimizer(d_params, names, lrs)
    alive, gen = torch.ones(3, dtype=torch.bool), torch.Generator().manual_seed(1)
    for real in reals:
        _, alive = train_iteration(g_params, d_params, g_opt, d_opt, real.flatten(1), alive, args, gen)
    assert alive.all()
    draws = replay_draws(1, 3, 4, args.n_critic, len(reals), args.g_noise)
    builders = {"adam": lambda p, lr: torch.optim.Adam(p, lr=lr, betas=(0.9, 0.999)),
                "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.0, dampening=0, weight_decay=0),
                "rmsprop": lambda p, lr: torch.optim.RMSprop(p, lr=lr, alpha=0.99, eps=1e-08, weight_decay=0,
                                                             momentum=0, centered=False)}
    for c, (name, lr) in enumerate(zip(names, lrs)):
        with torch.no_grad():
            for net, params in initial:
                for p, saved in zip(net.parameters(), params):
                    p.copy_(saved)
        optimizerG, optimizerD = builders[name](netG.parameters(), lr), builders[name](netD.parameters(), lr)
        for real, (critic_steps, _) in zip(reals, draws):
            for z, u in critic_steps:
                netD.zero_grad()
                output_real = netD(real).view(-1)
                fake = netG(z[c].view(4, 128, 1, 1))
                output_fake = netD(fake.detach()).view(-1)
                errD = -(output_real.mean() - output_fake.mean())
                errD = errD + 10.0 * authors_penalty(netD, real, fake, u[c, 8:, -1].view(4, 1, 1, 1))
                errD.backward()
                optimizerD.step()
            netG.zero_grad()
            errG = -netD(fake).view(-1).mean()
            errG.backward()
            optimizerG.step()
        theirs = [t for net in (netG, netD) for layer in net.fc for t in (layer.weight.t(), layer.bias.view(1, -1))]
        for mine, ref in zip(stacked, theirs):
            torch.testing.assert_close(mine[c], ref.detach(), rtol=1e-7, atol=1e-9)


def count_ops(num_cells):
    """Operator calls one train_iteration issues itself: aten ops not nested inside another aten op (the CPU bmm
    kernel loops over the batch inside one call, a GPU runs it as one batched kernel)."""
    args = Args(dataset="fake", batch_size=2, n_critic=2)
    torch.manual_seed(0)
    g_params, d_params = stack_params(make_generator(), num_cells), stack_params(make_critic(), num_cells)
    names = (["sgd", "rmsprop", "adam"] * num_cells)[:num_cells]
    g_opt = StackedOptimizer(g_params, names, [1e-3] * num_cells)
    d_opt = StackedOptimizer(d_params, names, [1e-3] * num_cells)
    alive, gen = torch.ones(num_cells, dtype=torch.bool), torch.Generator().manual_seed(0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train_iteration(g_params, d_params, g_opt, d_opt, torch.rand(2, 784) * 2 - 1, alive, args, gen)
    counts = Counter()
    for event in prof.events():
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if event.name.startswith("aten::") and parent is None:
            counts[event.name] += 1
    return counts


def test_operator_calls_do_not_grow_with_cells():
    one, four = count_ops(1), count_ops(4)
    assert one == four, {k: (one[k], four[k]) for k in set(one) | set(four) if one[k] != four[k]}
    assert sum(one.values()) > 100 and one["aten::baddbmm"] > 0   # the profiler did see the iteration


# ---------------------------------------------------------------- Table I from results dicts

def cell(opt, lr, fids, diverged_at=None):
    return {"optimizer": opt, "lr": lr, "status": "diverged" if diverged_at else "finished",
            "diverged_at_iteration": diverged_at,
            "metrics": [{"epoch": e, "fid": f, "extractor": "digits-cnn(mnist)", "num_real": 100, "num_fake": 100}
                        for e, f in fids], "losses": {"iteration": [], "d_loss": [], "g_loss": []}}


def test_summarize_builds_table1_from_results():
    one = {"cells": {"adam_0.1": cell("adam", 0.1, [(1, 300.0), (2, 281.94)]),
                     "adam_0.0001": cell("adam", 1e-4, [(1, 90.0), (2, 44.925)]),
                     "sgd_0.1": cell("sgd", 0.1, [], diverged_at=1),
                     "sgd_0.0001": cell("sgd", 1e-4, [(1, 60.0)], diverged_at=15)}}
    other = {"cells": {"rmsprop_0.1": cell("rmsprop", 0.1, [])}}
    one["args"] = other["args"] = {"seed": 1}
    with pytest.raises(ValueError, match="several seeds"):  # a second seed's cell never silently replaces the first
        summarize([one, {"cells": {"adam_0.1": cell("adam", 0.1, [])}, "args": {"seed": 2}}])
    table = summarize([one, other])
    lines = table.splitlines()
    assert "digits-cnn(mnist), 100 real / 100 fake" in lines[0] and "(epoch 2)" in lines[0]
    assert "| learning rate | Adam | SGD | RMSprop |" in lines
    assert "| 0.1 | 281.94 | N/A | — |" in lines                # the last evaluation; N/A = diverged; — = none
    assert "| 0.0001 | 44.92 | N/A |  |" in lines               # no rmsprop cell at 1e-4 in these runs
    assert "| sgd_0.0001 | 15 | 60.00 | N/A |" in lines          # scored after epoch 1, diverged in epoch 2
    assert "| sgd_0.1 | 1 | N/A | N/A |" in lines and "| adam_0.1 |  | 300.00 | 281.94 |" in lines


# ---------------------------------------------------------------- presets and flags

def test_presets_parse_and_cpu_mini_is_small():
    for name, preset in PRESETS.items():
        assert parse_args(["--preset", name]) == preset
    table1, paper = PRESETS["table1"], PRESETS["paper-gp"]
    assert (table1.penalty, table1.gp_weight, table1.fid_samples) == ("per-pixel", 1.0, 1000)
    assert table1.fid_epochs == (1, 51, 101, 151, 201, 251, 291) and table1.epochs == 300
    assert (paper.penalty, paper.gp_weight, paper.g_noise) == ("per-sample", 10.0, "fresh")
    mini = PRESETS["cpu-mini"]
    assert len(mini.optimizers) * len(mini.lrs) == 21 and mini.penalty == "per-pixel"
    assert mini.epochs * -(-mini.num_train // mini.batch_size) <= 400 and mini.fid_extractor == "digits"
    assert parse_args(["--preset", "table1", "--gp-weight", "3"]).gp_weight == 3.0


def test_help_shows_concrete_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--preset", "table1", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "default: per-pixel" in out and "default: 1.0" in out and "--n-critic" in out
    assert out.count("default: None") == 3                       # --run-name, --resume, --inception-weights


# ---------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def tiny(data_root, out, **extra):
    flags = {"dataset": "fake", "data-root": data_root, "num-train": 64, "batch-size": 16, "n-critic": 1,
             "fid-extractor": "digits", "fid-samples": 32, "log-every": 2, "output-dir": out, **extra}
    return [x for k, v in flags.items() for x in (f"--{k}", *([str(v)] if not isinstance(v, tuple) else v))]


def test_grid_run_writes_table_figures_and_marks_divergence(run_script, data_root, tmp_path):
    """2×2 grid: SGD and Adam at an absurd lr diverge (N/A); at 1e-4 they finish with a FID."""
    run_script(SCRIPT, *tiny(data_root, tmp_path, optimizers=("sgd", "adam"), lrs=("1e6", "1e-4"), epochs=2,
                             **{"fid-epochs": ("1", "2"), "run-name": "grid"}), cwd=tmp_path)
    run = tmp_path / "grid"
    results = json.loads((run / "results.json").read_text())
    cells = results["cells"]
    assert results["status"] == "finished" and results["script"] == SCRIPT and results["run_name"] == "grid"
    assert cells["sgd_1e+06"]["status"] == "diverged" and cells["sgd_1e+06"]["diverged_at_iteration"] >= 1
    assert cells["sgd_1e+06"]["metrics"] == [] and cells["adam_1e+06"]["status"] == "diverged"
    adam = cells["adam_0.0001"]
    assert adam["status"] == "finished" and [m["epoch"] for m in adam["metrics"]] == [1, 2]
    assert adam["metrics"][-1]["fid"] > 0 and adam["metrics"][-1]["extractor"] == "digits-cnn(fake)"
    assert adam["metrics"][-1]["num_real"] == adam["metrics"][-1]["num_fake"] == 32
    assert adam["losses"]["iteration"] == [2, 4, 6, 8] and len(adam["losses"]["g_loss"]) == 4
    table = (run / "table1.md").read_text()
    assert table == summarize([results]) and "| 1e+06 | N/A | N/A |" in table
    assert (run / "results.md").read_text().startswith("# grid")
    for fig in ("fig1_losses.png", "fig3_samples.png", "fig4_fid.png"):
        assert (run / fig).stat().st_size > 5000
    assert list(run.glob("events.out.tfevents.*"))


def test_compiled_run_writes_finished_results(run_script, data_root, tmp_path):
    run_script(SCRIPT, *tiny(data_root, tmp_path, optimizers=("adam",), lrs=("1e-4",), epochs=1, compile=(),
                             **{"fid-epochs": ("1",), "run-name": "compiled"}), cwd=tmp_path)
    results = json.loads((tmp_path / "compiled" / "results.json").read_text())
    assert json.loads((tmp_path / "compiled" / "args.json").read_text())["compile"] is True
    cell = results["cells"]["adam_0.0001"]
    assert results["status"] == "finished" and cell["status"] == "finished" and cell["metrics"][-1]["fid"] > 0
    assert all(math.isfinite(v) for key in ("d_loss", "g_loss") for v in cell["losses"][key])


def test_every_cell_diverged_exits_3(run_script, data_root, tmp_path):
    proc = run_script(SCRIPT, *tiny(data_root, tmp_path, optimizers=("sgd",), lr="1e9", epochs=3,
                                    **{"log-every": 1, "run-name": "dead"}), cwd=tmp_path, check=False)
    assert proc.returncode == 3, proc.stderr
    results = json.loads((tmp_path / "dead" / "results.json").read_text())
    assert results["status"] == "diverged" and results["iterations"] < 12
    assert (tmp_path / "dead" / "results.md").read_text().startswith("**diverged**")


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_lr_fails_in_one_line_and_writes_nothing(run_script, tmp_path, value):
    proc = run_script(SCRIPT, "--dataset", "fake", "--lr", value, "--output-dir", tmp_path / "runs", cwd=tmp_path,
                      check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: --lr is {value}: give a finite number"]
    assert not (tmp_path / "runs").exists()


RESUMABLE = {"optimizers": ("rmsprop", "adam"), "lrs": ("1e-4",), "num-train": 32, "batch-size": 8, "epochs": 3,
             "log-every": 3, "fid-epochs": ("1", "2")}   # 4 iterations an epoch, 12 in all; checkpoints at 4, 8, 12


@pytest.fixture(scope="module")
def straight(data_root, tmp_path_factory):
    """An uninterrupted reference run (and its results), with --save-model."""
    out = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, str(REPO / SCRIPT), *tiny(data_root, out, **RESUMABLE, **{"run-name": "ref"}),
                    "--save-model"], env=env, check=True, capture_output=True, cwd=out)
    return out / "ref"


def same_numbers(run_a, run_b):
    a, b = (json.loads((r / "results.json").read_text()) for r in (run_a, run_b))
    assert a["status"] == b["status"] == "finished" and a["iterations"] == b["iterations"] == 12
    for name in a["cells"]:
        assert a["cells"][name]["losses"] == b["cells"][name]["losses"]
        assert a["cells"][name]["losses"]["iteration"] == [3, 4, 6, 8, 9, 12]     # every 3 and at epoch ends
        assert a["cells"][name]["metrics"] == b["cells"][name]["metrics"] and len(a["cells"][name]["metrics"]) == 2
    ca, cb = (torch.load(r / "checkpoint.pt", weights_only=True) for r in (run_a, run_b))
    assert all(torch.equal(p, q) for p, q in zip(ca["g_params"] + ca["d_params"], cb["g_params"] + cb["d_params"]))


def test_reused_run_name_is_refused_and_the_first_run_is_untouched(run_script, straight, data_root):
    before = {p.name: p.read_bytes() for p in straight.iterdir() if p.is_file()}
    proc = run_script(SCRIPT, *tiny(data_root, straight.parent, **RESUMABLE, **{"run-name": "ref"}),
                      cwd=straight.parent, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {straight} already exists: choose another --run-name, or "
                                                f"continue it with --resume {straight}"]
    assert before == {p.name: p.read_bytes() for p in straight.iterdir() if p.is_file()}


def start(data_root, out, name):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen([sys.executable, str(REPO / SCRIPT), *tiny(data_root, out, **RESUMABLE, **{"run-name": name}),
                             "--save-model"], env=env, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_ctrl_c_then_resume_gives_the_uninterrupted_numbers(run_script, straight, data_root, tmp_path):
    proc = start(data_root, tmp_path, "stopped")
    for line in proc.stdout:                      # printed once the handlers are installed, just before the loop
        if line.startswith("training "):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert out.strip().splitlines()[-1].endswith(f"--resume {tmp_path / 'stopped'}")
    results = json.loads((tmp_path / "stopped" / "results.json").read_text())
    assert results["status"] == "interrupted" and results["iterations"] < 12
    assert (tmp_path / "stopped" / "results.md").read_text().startswith("**interrupted**")
    run_script(SCRIPT, "--resume", tmp_path / "stopped", cwd=tmp_path)
    same_numbers(straight, tmp_path / "stopped")


def test_sigkill_after_an_epoch_checkpoint_then_resume_gives_the_same_numbers(run_script, straight, data_root,
                                                                             tmp_path):
    proc = start(data_root, tmp_path, "killed")
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    while not checkpoint.exists() and proc.poll() is None:
        time.sleep(0.005)
    proc.kill()
    proc.communicate(timeout=60)
    assert torch.load(checkpoint, weights_only=True)["iteration"] in (4, 8)   # an epoch end, mid-run
    assert not (tmp_path / "killed" / "results.json").exists()
    run_script(SCRIPT, "--resume", tmp_path / "killed", cwd=tmp_path)
    same_numbers(straight, tmp_path / "killed")
