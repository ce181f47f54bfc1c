"""wgan_optimizer_study.py: networks, gradient penalty, stacked optimisers, stacking, divergence, outputs, resume."""
import csv
import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import wgan_optimizer_study as study
from wgan_optimizer_study import (Args, StackedOptimizer, critic, dropout_masks, generate, gradient_penalty,
                                  load_cell, make_critic, make_generator, stack_params, train_iteration)

SCRIPT = "wgan_optimizer_study.py"


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
    assert G(torch.randn(5, 128)).shape == (5, 1, 28, 28)
    assert critic(d_params, images, None).shape == (3, 5)
    # every cell of the stack computes what the plain module computes
    D.eval()
    torch.testing.assert_close(critic(d_params, images, None)[1], D(images[1].view(5, 1, 28, 28)).squeeze(1))
    torch.testing.assert_close(images[2].view(5, 1, 28, 28), G(z[2]))


def test_load_cell_round_trip():
    G = make_generator()
    params = stack_params(G, 2)
    with torch.no_grad():
        params[0][1].add_(1.0)
    other = load_cell(make_generator(), params, 1)
    z = torch.randn(4, 128)
    torch.testing.assert_close(other(z).flatten(1), generate(params, z.unsqueeze(0).expand(2, -1, -1))[1])


def test_dropout_masks_independent_per_cell():
    uniform = torch.rand(4, 64, 1792, generator=torch.Generator().manual_seed(0))
    masks = dropout_masks(uniform, 0.3, [1024, 512, 256])
    assert [m.shape[-1] for m in masks] == [1024, 512, 256]
    kept = (masks[0] > 0).float()
    assert abs(kept.mean().item() - 0.7) < 0.01
    assert torch.allclose(masks[0][masks[0] > 0], torch.tensor(1 / 0.7))
    assert not torch.equal(kept[0], kept[1])                  # cells do not share a mask
    assert dropout_masks(uniform, 0.0, [1024, 512, 256]) is None


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
    D = make_critic(0.0).double().eval()
    d_params = stack_params(D, 2)
    with torch.no_grad():                                       # make the two cells differ
        d_params[0][1].mul_(3.0)
    x = torch.rand(2, 4, 784, dtype=torch.float64) * 2 - 1
    penalty = gradient_penalty(lambda inp: critic(d_params, inp, None), x, per_pixel)
    for cell in range(2):
        reference = finite_difference_penalty(load_cell(make_critic(0.0).double().eval(), d_params, cell),
                                              x[cell], per_pixel)
        torch.testing.assert_close(penalty[cell], reference, rtol=1e-6, atol=1e-9)
    other = gradient_penalty(lambda inp: critic(d_params, inp, None), x, not per_pixel)
    assert (other - penalty).abs().min() > 1e-3                # the two variants are different penalties
    # the penalty is differentiable w.r.t. the critic's parameters (double backward)
    (g,) = torch.autograd.grad(penalty.sum(), d_params[0])
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_stacked_optimizer_matches_torch_optim_step_for_step():
    torch.manual_seed(0)
    names, lrs = ["sgd", "rmsprop", "adam", "adam"], [1e-2, 1e-3, 1e-3, 1e-1]
    shapes = [(5, 7), (1, 7)]
    start = [torch.randn(len(names), *s) for s in shapes]
    stacked = [p.clone() for p in start]
    opt = StackedOptimizer(stacked, names, lrs)
    singles, torch_opts = [], []
    for c, (name, lr) in enumerate(zip(names, lrs)):
        params = [torch.nn.Parameter(p[c].clone()) for p in start]
        cls = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam}[name]
        singles.append(params)
        torch_opts.append(cls(params, lr=lr))
    active = torch.ones(len(names), dtype=torch.bool)
    for step in range(6):
        grads = [torch.randn_like(p) * 10 ** (step % 3 - 1) for p in stacked]
        opt.step(grads, active)
        for c, params in enumerate(singles):
            for p, g in zip(params, grads):
                p.grad = g[c].clone()
            torch_opts[c].step()
            for p, mine in zip(params, stacked):
                if names[c] == "sgd":   # torch's add(alpha=) rounds once (fused multiply-add): ≤ 1 ulp apart
                    torch.testing.assert_close(mine[c], p.detach(), rtol=1e-6, atol=1e-8)
                else:                    # RMSprop and Adam: the same operations in the same order, bit for bit
                    assert torch.equal(mine[c], p.detach()), (c, step)
    # an inactive cell keeps its parameters; the others move
    before = [p.clone() for p in stacked]
    opt.step([torch.full_like(p, float("nan")) for p in stacked], torch.tensor([True, False, True, True]))
    assert torch.equal(stacked[0][1], before[0][1])
    assert not torch.equal(stacked[0][2], before[0][2])


class Recorder:
    """Draws random tensors and keeps them, so a single-cell run can replay one cell's slice."""

    def __init__(self, seed):
        self.gen, self.draws = torch.Generator().manual_seed(seed), []

    def randn(self, shape):
        self.draws.append(torch.randn(shape, generator=self.gen, dtype=torch.float64))
        return self.draws[-1]

    def rand(self, shape):
        self.draws.append(torch.rand(shape, generator=self.gen, dtype=torch.float64))
        return self.draws[-1]


def plain_iteration(G, D_linears, g_opt, d_opt, real, draws, args):
    """One generator iteration of a single cell written with plain modules and torch.optim, from the draws
    (the same noise, interpolation weights and dropout uniforms) a stacked run used for that cell."""
    def critic_fn(x, uniform):
        keep = [(u >= args.dropout).double() / (1 - args.dropout) for u in uniform.split([1024, 512, 256], -1)]
        for i, layer in enumerate(D_linears):
            x = layer(x)
            if i < 3:
                x = F.leaky_relu(x, 0.2) * keep[i]
        return x.squeeze(-1)

    B = len(real)
    for _ in range(args.critic_steps):
        z, uniforms = next(draws), next(draws)
        fake = G(z).flatten(1).detach()
        d_loss = critic_fn(fake, uniforms[B:2 * B, :-1]).mean() - critic_fn(real, uniforms[:B, :-1]).mean()
        eps = uniforms[2 * B:, -1:]
        penalty = 0
        for b in range(B):                                      # per-sample gradient, one sample at a time
            xb = (eps[b] * real[b] + (1 - eps[b]) * fake[b]).unsqueeze(0).requires_grad_(True)
            (grad,) = torch.autograd.grad(critic_fn(xb, uniforms[2 * B + b:2 * B + b + 1, :-1]).sum(), xb,
                                          create_graph=True)
            penalty = penalty + (grad.norm() - 1) ** 2 / B
        d_opt.zero_grad()
        (d_loss + args.gp_lambda * penalty).backward()
        d_opt.step()
    z, uniforms = next(draws), next(draws)
    g_opt.zero_grad()
    (-critic_fn(G(z).flatten(1), uniforms).mean()).backward()
    g_opt.step()


def test_stacked_cell_equals_that_cell_trained_alone():
    """A 3-cell stack (SGD, RMSprop, Adam) for 2 generator iterations; each cell is then retrained alone with
    nn.Linear layers, torch.optim and the per-sample penalty written as a loop, on the same draws."""
    args = Args(dataset="fake", batch_size=4, critic_steps=2, optimizers=("sgd", "rmsprop", "adam"), lrs=(1e-3,))
    torch.manual_seed(0)
    G0, D0 = make_generator().double(), make_critic(args.dropout).double()
    g_params, d_params = stack_params(G0, 3), stack_params(D0, 3)
    names, lrs = ["sgd", "rmsprop", "adam"], [1e-2, 1e-3, 1e-3]
    g_opt, d_opt = StackedOptimizer(g_params, names, lrs), StackedOptimizer(d_params, names, lrs)
    reals = [torch.rand(4, 784, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) * 2 - 1
             for i in range(2)]
    rec = Recorder(1)
    alive = torch.ones(3, dtype=torch.bool)
    for real in reals:
        stats, alive = train_iteration(g_params, d_params, g_opt, d_opt, real, alive, args, rec.randn, rec.rand)
    assert alive.all()
    for c, (name, lr) in enumerate(zip(names, lrs)):
        torch.manual_seed(0)
        G, D = make_generator().double(), make_critic(args.dropout).double()
        D_linears = [m for m in D if isinstance(m, torch.nn.Linear)]
        cls = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam}[name]
        g_opt1, d_opt1 = cls(G.parameters(), lr=lr), cls(D.parameters(), lr=lr)
        draws = iter(d[c] for d in rec.draws)
        for real in reals:
            plain_iteration(G, D_linears, g_opt1, d_opt1, real, draws, args)
        for mine, ref in zip(g_params + d_params, stack_params(G, 1) + stack_params(D, 1)):
            torch.testing.assert_close(mine[c], ref[0].detach(), rtol=1e-7, atol=1e-9)


def count_ops(num_cells):
    args = Args(dataset="fake", batch_size=8, optimizers=("sgd", "adam"), lrs=(1e-3,))
    torch.manual_seed(0)
    g_params, d_params = stack_params(make_generator(), num_cells), stack_params(make_critic(), num_cells)
    names = (["sgd", "rmsprop", "adam"] * num_cells)[:num_cells]
    g_opt, d_opt = StackedOptimizer(g_params, names, [1e-3] * num_cells), StackedOptimizer(d_params, names,
                                                                                          [1e-3] * num_cells)
    gen = torch.Generator().manual_seed(0)
    alive = torch.ones(num_cells, dtype=torch.bool)
    real = torch.rand(8, 784) * 2 - 1
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train_iteration(g_params, d_params, g_opt, d_opt, real, alive, args,
                        lambda s: torch.randn(s, generator=gen), lambda s: torch.rand(s, generator=gen))
    return study.top_level_op_counts(prof)


def test_operator_calls_do_not_grow_with_cells():
    """Operator calls the program issues per generator iteration (aten ops not nested in another aten op; the
    CPU bmm kernel loops over the batch inside one call, a GPU runs it as one batched kernel)."""
    one, seven = count_ops(1), count_ops(7)
    assert one == seven, {k: (one[k], seven[k]) for k in set(one) | set(seven) if one[k] != seven[k]}
    assert sum(one.values()) > 100 and one["aten::baddbmm"] > 0   # the profiler did see the iteration


def test_same_seed_same_losses_and_divergence_freezes_cell():
    def run():
        args = Args(dataset="fake", batch_size=8, critic_steps=2)
        torch.manual_seed(3)
        g_params, d_params = stack_params(make_generator(), 2), stack_params(make_critic(), 2)
        names, lrs = ["sgd", "adam"], [1e6, 1e-4]
        g_opt, d_opt = StackedOptimizer(g_params, names, lrs), StackedOptimizer(d_params, names, lrs)
        gen = torch.Generator().manual_seed(0)
        alive, history = torch.ones(2, dtype=torch.bool), []
        for i in range(4):
            real = torch.rand(8, 784, generator=gen) * 2 - 1
            stats, alive = train_iteration(g_params, d_params, g_opt, d_opt, real, alive, args,
                                           lambda s: torch.randn(s, generator=gen), lambda s: torch.rand(s, generator=gen))
            history.append(stats)
        return torch.stack(history), alive, g_params
    a, alive_a, params_a = run()
    b, alive_b, _ = run()
    assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    assert alive_a.tolist() == [False, True]                  # SGD at lr 1e6 blew up, Adam at 1e-4 goes on
    assert torch.isfinite(a[:, :, 1]).all()
    assert all(torch.isfinite(p[0]).all() for p in params_a)  # the diverged cell is frozen at finite weights


@pytest.mark.parametrize("bad, message", [(dict(lr=-1e-3), "positive"), (dict(batch_size=0), "batch-size"),
                                          (dict(lrs=(1e-3, 1e-3)), "repeat"), (dict(dropout=1.0), "dropout")])
def test_bad_arguments_fail_with_a_message(bad, message):
    with pytest.raises(SystemExit, match=message):
        Args(**bad)


def test_defaults_are_table_i_and_penalty_lambda():
    args = Args()
    assert args.lrs == study.TABLE_I_LRS and len(args.cells) == 21 and args.gp_lambda == 10.0
    assert Args(penalty="per-pixel").gp_lambda == 1.0
    assert Args(optimizer="adam", lr=1e-4).cells == ("adam_lr0.0001",)


def test_help(run_script, tmp_path):
    out = run_script(SCRIPT, "--help", cwd=tmp_path).stdout
    assert "--optimizers" in out and "--penalty" in out and "--fid-extractor" in out


def test_grid_run_writes_table_figure_samples_and_marks_divergence(run_script, tmp_path):
    """2×2 grid on fake data: SGD at an absurd lr diverges and is N/A; Adam at 1e-4 finishes with a FID."""
    common = ["--dataset", "fake", "--data-root", tmp_path / "data", "--num-train", "64", "--batch-size", "32",
              "--critic-steps", "1", "--fid-extractor", "digits", "--fid-samples", "64", "--fid-every", "1",
              "--log-every", "1", "--output-dir", tmp_path / "runs"]
    proc = run_script(SCRIPT, *common, "--optimizers", "sgd", "adam", "--lrs", "1e6", "1e-4", "--epochs", "2",
                      "--run-name", "grid", cwd=tmp_path)
    assert proc.returncode == 0
    run = tmp_path / "runs" / "grid"
    results = json.loads((run / "results.json").read_text())
    cells = results["cells"]
    assert cells["sgd_lr1e+06"]["diverged"] and cells["sgd_lr1e+06"]["final_fid"] is None
    assert not cells["adam_lr0.0001"]["diverged"] and cells["adam_lr0.0001"]["final_fid"] > 0
    assert [e for e, _ in cells["adam_lr0.0001"]["fid_history"]] == [1, 2]
    assert results["fid_extractor"] == "digits-cnn(fake)" and "64 real" in results["fid"]
    rows = list(csv.reader(open(run / "table1.csv")))
    assert rows[0] == ["learning_rate", "sgd", "adam"] and rows[1][1] == "N/A" and rows[2][2] != "N/A"
    assert "N/A" in (run / "table1.md").read_text() and "| SGD | Adam |" in (run / "results.md").read_text()
    assert (run / "fid_curves.png").stat().st_size > 1000
    assert sorted(p.name for p in (run / "samples").iterdir()) == sorted(f"{c}.png" for c in cells)
    events = list(run.glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 1000


def test_resume_continues_to_the_same_numbers(run_script, mnist_root, tmp_path):
    common = ["--dataset", "mnist", "--data-root", mnist_root, "--num-train", "64", "--batch-size", "32",
              "--critic-steps", "2", "--optimizers", "rmsprop", "adam", "--lrs", "1e-4", "--fid-extractor", "digits",
              "--fid-samples", "32", "--fid-every", "1", "--output-dir", tmp_path / "runs", "--save-model"]
    run_script(SCRIPT, *common, "--epochs", "2", "--run-name", "straight", cwd=tmp_path)
    run_script(SCRIPT, *common, "--epochs", "1", "--run-name", "resumed", cwd=tmp_path)
    run_script(SCRIPT, *common, "--epochs", "2", "--resume", tmp_path / "runs" / "resumed" / "checkpoint.pt",
               cwd=tmp_path)
    straight = json.loads((tmp_path / "runs" / "straight" / "results.json").read_text())["cells"]
    resumed = json.loads((tmp_path / "runs" / "resumed" / "results.json").read_text())["cells"]
    for name in straight:
        assert straight[name]["loss_history"] == resumed[name]["loss_history"]
        assert straight[name]["fid_history"] == resumed[name]["fid_history"]
        assert len(resumed[name]["fid_history"]) == 2
    saved = torch.load(tmp_path / "runs" / "resumed" / "models" / "adam_lr0.0001.pt", weights_only=True)
    make_generator().load_state_dict(saved["generator"])      # per-cell weights load into the plain modules
