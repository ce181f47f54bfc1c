"""Tests of alpha_dual_gan.py: α-loss against closed forms and against an independent transcription of the authors'
AlphaLoss, the tilted optimal discriminator by numerical minimisation, the ring metrics against a transcription of
the authors' per-sample compute_metrics loop, stacked training against plain nn.Linear + Adam per seed, operator
counts independent of the stack size, masking of a non-finite seed, and subprocess runs of the run lifecycle
(reused names, bad numbers, Ctrl-C, bit-identical --resume, all-diverged exit code, presets)."""
import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

import alpha_dual_gan as adg
from conftest import REPO, skip_if_medium_changed_nothing, skip_unless_medium_reduces_matmuls

ALPHAS = [0.3, 0.5, 0.9, 1.2, 2.0, 10.0]
TINY_RING = ["--num-train", "128", "--batch-size", "64", "--layers", "1", "1", "--widths", "8", "4", "--num-seeds", "2",
             "--alpha-ds", "0.5"]


def direct_alpha_loss(y: int, prob: np.ndarray, alpha: float) -> np.ndarray:
    """The paper's formula on probabilities, in numpy float64."""
    e = (alpha - 1) / alpha
    return alpha / (alpha - 1) * (1 - y * prob ** e - (1 - y) * (1 - prob) ** e)


class AuthorsAlphaLoss(nn.Module):
    """Transcription of AlphaLoss.forward in the authors' gan.py (SankarLab/AlphaGan-Papers-Results), ep = 1e-7."""

    def __init__(self, alpha, ep=1e-7):
        super().__init__()
        self.alpha, self.ep, self.sigmoid, self.bce = alpha, ep, nn.Sigmoid(), nn.BCELoss()

    def forward(self, logits, labels):
        if self.alpha == 1:
            return self.bce(self.sigmoid(logits), labels)
        output = torch.clamp(self.sigmoid(logits), min=self.ep, max=1 - self.ep)
        A = (self.alpha / (self.alpha - 1)) if not math.isinf(self.alpha) else self.limit_A
        real_term = A * (1 - labels * (output ** (1 / A)))
        fake_term = -A * ((1 - labels) * (1 - output) ** (1 / A))
        return torch.mean(real_term + fake_term)

    limit_A = 1.0  # α = ∞: their A = ∞/∞ is NaN (checked below); the α → ∞ limit of A is 1


# ---------------------------------------------------------------- α-loss

def test_alpha_one_is_binary_cross_entropy():
    z = torch.linspace(-20, 20, 101, dtype=torch.float64)
    for y in (0, 1):
        bce = F.binary_cross_entropy_with_logits(z, torch.full_like(z, y), reduction="none")
        torch.testing.assert_close(adg.alpha_loss(z, y, 1.0), bce)
        for alpha in (1 - 1e-6, 1 + 1e-6):  # continuity: α → 1 from both sides approaches the log-loss
            torch.testing.assert_close(adg.alpha_loss(z, y, alpha), bce, rtol=1e-4, atol=1e-5)


def test_alpha_infinity_is_total_variation_form():
    z = torch.linspace(-15, 15, 61, dtype=torch.float64)
    p = torch.sigmoid(z)
    torch.testing.assert_close(adg.alpha_loss(z, 1, math.inf), 1 - p)
    torch.testing.assert_close(adg.alpha_loss(z, 0, math.inf), p)
    torch.testing.assert_close(adg.alpha_loss(z, 1, 1e9), 1 - p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_stable_form_equals_direct_formula(alpha):
    z = np.linspace(-8, 8, 81)
    prob = 1 / (1 + np.exp(-z))
    for y in (0, 1):
        expected = direct_alpha_loss(y, prob, alpha)
        np.testing.assert_allclose(adg.alpha_loss(torch.tensor(z), y, alpha).numpy(), expected, rtol=1e-9, atol=1e-12)
        clamped = adg.alpha_loss(torch.tensor(z), y, alpha, clamp_probs=True).numpy()  # same function away from the clamp
        np.testing.assert_allclose(clamped, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("alpha", [0.3, 0.5, 1.0, 1.2, math.inf])
def test_clamped_form_is_the_authors_alpha_loss(alpha):
    """--clamp-probs against the authors' AlphaLoss.forward (mean over a B×1 batch, float32): values and gradients at
    logits up to ±30, where the clamp (α ≠ 1) or BCELoss's own limits (α = 1) decide the gradient."""
    z = torch.cat([torch.linspace(-30, 30, 61), torch.tensor([-20.0, -16.2, 16.2, 20.0])])
    for y in (0, 1):
        ours_z, theirs_z = z.clone().requires_grad_(True), z.clone()[:, None].requires_grad_(True)
        ours = adg.alpha_loss(ours_z, y, alpha, clamp_probs=True).mean()
        theirs = AuthorsAlphaLoss(alpha)(theirs_z, torch.full((len(z), 1), float(y)))
        (g_ours,), (g_theirs,) = torch.autograd.grad(ours, ours_z), torch.autograd.grad(theirs, theirs_z)
        torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(g_ours, g_theirs[:, 0], rtol=2e-6, atol=1e-9)
        assert torch.isfinite(g_ours).all()
    if alpha == 1:  # BCE on σ(z): at z = −20 a real sample still gets the full gradient −1 / B, the exact form too
        zz = torch.tensor([-20.0], requires_grad=True)
        (g,) = torch.autograd.grad(adg.alpha_loss(zz, 1, 1.0, clamp_probs=True).sum(), zz)
        assert g.item() == pytest.approx(-1.0, abs=1e-6)
    if math.isinf(alpha):  # their A = α/(α−1) is ∞/∞ = NaN there: we use the limit A = 1
        assert math.isnan(math.inf / (math.inf - 1))


@pytest.mark.parametrize("alpha", [0.3, 0.5, 1.0, 1.2, 2.0, math.inf])
def test_gradients_finite_at_saturated_logits(alpha):
    for y in (0, 1):
        z = torch.tensor([-30.0, -10.0, 0.0, 10.0, 30.0], requires_grad=True)  # float32, as in training
        loss = adg.alpha_loss(z, y, alpha)
        (grad,) = torch.autograd.grad(loss.sum(), z)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), (alpha, y, loss, grad)
        wrong = 0 if y == 1 else -1  # the confidently wrong logit (−30 for a real, +30 for a fake)
        assert grad[wrong].abs() > 0, "the exact form keeps a gradient where D is confidently wrong"
        z2 = z.detach().clone().requires_grad_(True)
        (grad2,) = torch.autograd.grad(adg.alpha_loss(z2, y, alpha, clamp_probs=True).sum(), z2)
        if alpha != 1:  # the authors' clamp: σ(z) clamped to [1e-7, 1 − 1e-7] has no gradient at ±30
            assert grad2[wrong] == 0


def test_nonpositive_alpha_rejected():
    for alpha in (0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="α must be in"):
            adg.alpha_loss(torch.zeros(3), 1, alpha)
    for bad in (dict(alpha_ds=(0.5, 0.0)), dict(alpha_gs=(-1.0,)), dict(lr=-1e-4), dict(lr_sweep=(1e-4, math.nan)),
                dict(betas=(0.9, 1.0)), dict(layers=(0, 4)), dict(alpha_ds=())):
        with pytest.raises(SystemExit, match="error: --" + next(iter(bad)).replace("_", "-")):
            adg.validate(adg.Args(**bad))
    adg.validate(adg.Args(alpha_ds=(math.inf, 0.5)))  # α = ∞ is the paper's soft 0-1 loss


def test_objectives_reduce_to_vanilla_and_lsgan():
    d_real, d_fake = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    log_d = F.logsigmoid
    torch.testing.assert_close(adg.discriminator_loss(d_real, d_fake, 1.0),
                               -(log_d(d_real).mean(-1) + log_d(-d_fake).mean(-1)))
    torch.testing.assert_close(adg.generator_loss(d_fake, 1.0, non_saturating=False), log_d(-d_fake).mean(-1))
    torch.testing.assert_close(adg.generator_loss(d_fake, 1.0, non_saturating=True), -log_d(d_fake).mean(-1))
    lsgan_d = 0.5 * ((d_real - 1) ** 2).mean(-1) + 0.5 * (d_fake ** 2).mean(-1)
    torch.testing.assert_close(adg.discriminator_loss(d_real, d_fake, 0.5, lsgan=True), lsgan_d)
    torch.testing.assert_close(adg.generator_loss(d_fake, 2.0, True, lsgan=True), 0.5 * ((d_fake - 1) ** 2).mean(-1))


@pytest.mark.parametrize("alpha", [0.3, 0.5, 1.0, 2.0, 5.0])
def test_optimal_discriminator_is_tilted_posterior(alpha):
    """Minimise p_r·ℓ_α(1, ŷ) + p_g·ℓ_α(0, ŷ) over the logit pointwise and compare with Theorem 1."""
    for p_r, p_g in [(0.7, 0.2), (0.05, 0.9), (1.3, 0.4), (0.5, 0.5)]:
        def risk(z):
            t = torch.tensor([z], dtype=torch.float64)
            return float(p_r * adg.alpha_loss(t, 1, alpha) + p_g * adg.alpha_loss(t, 0, alpha))
        z_star = minimize_scalar(risk, bounds=(-25, 25), method="bounded", options={"xatol": 1e-10}).x
        assert abs(1 / (1 + math.exp(-z_star)) - p_r ** alpha / (p_r ** alpha + p_g ** alpha)) < 1e-5


# ---------------------------------------------------------------- ring metrics

def authors_compute_metrics(output: np.ndarray) -> dict:
    """Transcription of compute_metrics in the authors' experiments/2D.py (make_ring's modes, std √1e-4, P_real the
    true 1/8): each sample to its closest mode, lost modes, high-quality samples, KL(P_real ‖ P_fake)."""
    means = [torch.Tensor([np.cos(2 * np.pi * i / 8), np.sin(2 * np.pi * i / 8)]).numpy() for i in range(1, 9)]
    stds, probs = [np.sqrt(1e-4)] * 8, [1 / 8] * 8
    means_dict = {str(mean): [] for mean in means}
    for i in range(output.shape[0]):
        sample = output[i, :]
        dists = [(mean, np.linalg.norm(sample - mean)) for mean in means]
        means_dict[str(min(dists, key=lambda x: x[1])[0])].append(sample)
    p_fake = (np.array([len(means_dict[str(mean)]) for mean in means]) + 1) / (output.shape[0] + len(means))
    p_real = np.array(probs)
    lost_modes, hq_samples = 0, 0
    for mean, std in zip(means, stds):
        samples = means_dict[str(mean)]
        hqs_mode = np.sum([np.linalg.norm(s - mean) <= 3 * std for s in samples]) if samples else 0
        lost_modes += int(hqs_mode < 1)
        hq_samples += hqs_mode
    return {"modes": len(means) - lost_modes, "hqs": hq_samples / output.shape[0],
            "kl": np.sum(p_real * np.log(p_real / p_fake))}


def test_ring_metrics_match_the_authors_loop():
    centers, gen = adg.ring_data().centers, torch.Generator().manual_seed(0)
    sets = [centers.repeat(10, 1),                                           # exactly on every mode
            centers[3].expand(80, 2).clone(),                                # all on one mode
            2 * centers[0].expand(80, 2).clone(),                            # nearest mode 0, but 1.0 away
            centers[torch.randint(8, (80,), generator=gen)] + 0.02 * torch.randn(80, 2, generator=gen),  # ~half within 3σ
            centers[torch.randint(3, (80,), generator=gen)] + 0.012 * torch.randn(80, 2, generator=gen),  # 3 modes
            3 * torch.randn(80, 2, generator=gen)]                           # scattered far and wide
    m = adg.ring_metrics(torch.stack(sets), centers, 0.01)
    for i, s in enumerate(sets):
        theirs = authors_compute_metrics(s.numpy())
        assert int(m["modes"][i]) == theirs["modes"], i
        assert float(m["hq"][i]) == pytest.approx(theirs["hqs"], abs=1e-12), i
        assert float(m["kl"][i]) == pytest.approx(theirs["kl"], rel=1e-6), i
    assert [int(v) for v in m["modes"][:3]] == [8, 1, 0] and 0 < float(m["hq"][3]) < 1


def test_ring_metrics_flag_non_finite_sets():
    samples = adg.ring_data().centers.repeat(10, 1).expand(2, -1, -1).clone()
    samples[1, 5, 0] = float("nan")
    m = adg.ring_metrics(samples, adg.ring_data().centers, 0.01)
    assert m["finite"].tolist() == [True, False] and m["modes"].tolist() == [8, 0]
    assert math.isnan(m["kl"][1]) and m["kl"][0] == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- stacked training

def reference_mlp(stacked: adg.StackedMLP, member: int, slope: float) -> nn.Sequential:
    """Plain nn.Linear layers holding member `member`'s weights (nn.Linear stores W as out×in)."""
    layers = []
    for i, (w, b) in enumerate(zip(stacked.weights, stacked.biases)):
        linear = nn.Linear(w.shape[1], w.shape[2])
        with torch.no_grad():
            linear.weight.copy_(w[member].T)
            linear.bias.copy_(b[member, 0])
        layers.append(linear)
        if i < len(stacked.weights) - 1:
            layers.append(nn.LeakyReLU(slope) if slope else nn.ReLU())
    return nn.Sequential(*layers)


@pytest.mark.parametrize("alpha_d,alpha_g,non_saturating", [(0.5, 1.2, False), (1.0, 1.0, True)])
def test_stacked_training_equals_separate_training(alpha_d, alpha_g, non_saturating):
    seeds, steps, batch = [3, 4], 6, 32
    gen_net, disc_net, _ = adg.ring_networks(seeds, width_g=24, width_d=16, g_layers=2, d_layers=3)
    assert [w.shape[1:] for w in gen_net.weights] == [(2, 24), (24, 24), (24, 2)]  # depth = hidden layers
    for s, seed in enumerate(seeds):  # a seed's init does not depend on its stack neighbours
        alone_g, alone_d, _ = adg.ring_networks([seed], width_g=24, width_d=16, g_layers=2, d_layers=3)
        for p, q in zip([*gen_net.parameters(), *disc_net.parameters()], [*alone_g.parameters(), *alone_d.parameters()]):
            assert torch.equal(p[s], q[0])
    refs = [(reference_mlp(gen_net, s, 0.0), reference_mlp(disc_net, s, 0.2)) for s in range(len(seeds))]
    opt_g = adg.adam(gen_net.parameters(), 1e-3, (0.9, 0.99), torch.device("cpu"))
    opt_d = adg.adam(disc_net.parameters(), 1e-3, (0.9, 0.99), torch.device("cpu"))
    ref_opts = [(torch.optim.Adam(g.parameters(), lr=1e-3, betas=(0.9, 0.99)),
                 torch.optim.Adam(d.parameters(), lr=1e-3, betas=(0.9, 0.99))) for g, d in refs]
    gen = torch.Generator().manual_seed(0)
    alive = torch.ones(len(seeds), dtype=torch.bool)
    for _ in range(steps):
        real = torch.randn(len(seeds), batch, 2, generator=gen)
        noise = torch.randn(len(seeds), batch, 2, generator=gen)
        _, _, alive = adg.train_step(gen_net, disc_net, opt_g, opt_d, real, noise, alive, alpha_d, alpha_g,
                                     non_saturating)
        for s, ((g, d), (og, od)) in enumerate(zip(refs, ref_opts)):  # textbook alternation, one seed at a time
            fake = g(noise[s])
            d_loss = (adg.alpha_loss(d(real[s]).squeeze(-1), 1, alpha_d).mean()
                      + adg.alpha_loss(d(fake.detach()).squeeze(-1), 0, alpha_d).mean())
            od.zero_grad()
            d_loss.backward()
            od.step()
            out = d(fake).squeeze(-1)
            g_loss = adg.alpha_loss(out, 1, alpha_g).mean() if non_saturating else -adg.alpha_loss(out, 0, alpha_g).mean()
            og.zero_grad()
            g_loss.backward()
            og.step()
    assert alive.all()
    for s, (g, d) in enumerate(refs):
        for stacked, ref in ((gen_net, g), (disc_net, d)):
            linears = [m for m in ref if isinstance(m, nn.Linear)]
            for w, b, lin in zip(stacked.weights, stacked.biases, linears):
                torch.testing.assert_close(w[s].detach(), lin.weight.detach().T, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(b[s, 0].detach(), lin.bias.detach(), rtol=1e-5, atol=1e-6)


def count_ops_per_step(num_seeds: int) -> int:
    from torch.profiler import ProfilerActivity, profile
    gen_net, disc_net, _ = adg.ring_networks(list(range(num_seeds)), width_g=16, width_d=8)
    opt_g = adg.adam(gen_net.parameters(), 1e-4, (0.9, 0.99), torch.device("cpu"))
    opt_d = adg.adam(disc_net.parameters(), 1e-4, (0.9, 0.99), torch.device("cpu"))
    real, noise = torch.randn(num_seeds, 32, 2), torch.randn(num_seeds, 32, 2)
    alive = torch.ones(num_seeds, dtype=torch.bool)
    for _ in range(2):  # warm-up (Adam creates its state on the first step)
        adg.train_step(gen_net, disc_net, opt_g, opt_d, real, noise, alive, 0.5, 1.0, False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        adg.train_step(gen_net, disc_net, opt_g, opt_d, real, noise, alive, 0.5, 1.0, False, clamp_probs=True)
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def test_operator_calls_do_not_grow_with_stack_size():
    counts = {n: count_ops_per_step(n) for n in (1, 4, 16)}
    assert counts[1] > 20 and len(set(counts.values())) == 1, counts


def run_steps(step_fn, nets, steps: int = 3, seed: int = 0, **kw):
    """`steps` training steps of fresh copies of `nets` (gen_net, disc_net); per step the losses and every gradient."""
    gen_net, disc_net = (copy.deepcopy(m) for m in nets)
    opt_g, opt_d = (adg.adam(m.parameters(), 1e-4, (0.9, 0.99), torch.device("cpu")) for m in (gen_net, disc_net))
    gen, record = torch.Generator().manual_seed(seed), []
    for _ in range(steps):
        real, noise = torch.randn(*kw["real"], generator=gen), torch.randn(*kw["noise"], generator=gen)
        alive = torch.ones(kw["real"][0] if kw.get("stacked", True) else 1, dtype=torch.bool)
        d_loss, g_loss, _ = step_fn(gen_net, disc_net, opt_g, opt_d, real, noise, alive, 0.5, 1.2, False,
                                    kw.get("lsgan", False), kw.get("clamp_probs", False))
        record.append([d_loss, g_loss] + [p.grad.clone() for m in (gen_net, disc_net) for p in m.parameters()])
    return record, [p.detach() for m in (gen_net, disc_net) for p in m.parameters()]


def assert_records_close(a, b, rtol, atol):
    for step_a, step_b in zip(a, b):
        for x, y in zip(step_a, step_b):
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("clamp_probs", [False, True])
def test_compiled_step_matches_eager(clamp_probs):
    """--compile traces the same train_step. Inductor fuses and reorders float32 reductions, so losses and gradients
    may differ in the last bits (~1e-6 relative); gradients are compared at every step (Adam would hide a wrong
    gradient magnitude: its first steps are ±lr whatever the scale), parameters after 3 steps to 1% of one step."""
    nets = adg.ring_networks([1, 2], width_g=16, width_d=8, g_layers=2, d_layers=2)[:2]
    shapes = dict(real=(2, 32, 2), noise=(2, 32, 2), clamp_probs=clamp_probs)
    eager, eager_params = run_steps(adg.train_step, nets, **shapes)
    torch._dynamo.reset()
    compiled, compiled_params = run_steps(torch.compile(adg.train_step), nets, **shapes)
    assert_records_close(eager, compiled, rtol=1e-4, atol=1e-6)
    for x, y in zip(eager_params, compiled_params):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_compiled_image_step_matches_eager():
    """The DCGAN path (BatchNorm in training mode, one seed) compiled: same losses, gradients and parameters."""
    torch.manual_seed(0)
    nets = adg.dcgan(28, 3, z_dim=8, width=4)
    shapes = dict(real=(4, 3, 28, 28), noise=(4, 8), stacked=False)
    eager, eager_params = run_steps(adg.train_step, nets, steps=2, **shapes)
    torch._dynamo.reset()
    compiled, compiled_params = run_steps(torch.compile(adg.train_step), nets, steps=2, **shapes)
    assert_records_close(eager, compiled, rtol=1e-4, atol=1e-5)
    for x, y in zip(eager_params, compiled_params):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_medium_precision_training_stays_close_and_metrics_do_not_change():
    """--matmul-precision medium (bf16-backed float32 matmuls where the CPU has them; bf16 keeps 8 significant bits,
    ~4e-3 relative per product): three ring steps agree with full float32 to 2% in losses and gradients. The ring
    metrics of the same samples are bit-identical whatever the setting (metrics run in full precision)."""
    skip_unless_medium_reduces_matmuls()
    nets = adg.ring_networks([1, 2], width_g=64, width_d=32, g_layers=2, d_layers=2)[:2]
    shapes = dict(real=(2, 64, 2), noise=(2, 64, 2))
    centers = torch.tensor([[math.cos(2 * math.pi * i / 8), math.sin(2 * math.pi * i / 8)] for i in range(8)])
    gen = torch.Generator().manual_seed(5)  # points within ±2% of the high-quality radius 3·0.01: decided by rounding
    angle = 2 * math.pi * torch.rand(3, 4096, generator=gen)
    radius = 0.03 * (1 + 0.04 * (torch.rand(3, 4096, generator=gen) - 0.5))
    offsets = radius[..., None] * torch.stack([angle.cos(), angle.sin()], -1)
    samples = centers[torch.randint(8, (3, 4096), generator=gen)] + offsets
    try:
        highest, _ = run_steps(adg.train_step, nets, **shapes)
        metrics_highest = adg.ring_metrics(samples, centers, 0.01)
        torch.set_float32_matmul_precision("medium")
        medium, _ = run_steps(adg.train_step, nets, **shapes)
        metrics_medium = adg.ring_metrics(samples, centers, 0.01)
    finally:
        torch.set_float32_matmul_precision("highest")
    skip_if_medium_changed_nothing(highest, medium)
    assert_records_close(highest, medium, rtol=2e-2, atol=2e-3)
    for key in metrics_highest:
        assert torch.equal(metrics_highest[key], metrics_medium[key]), key


def test_non_finite_seed_is_masked_and_others_continue():
    seeds = [1, 2, 3]
    nets = [adg.ring_networks(seeds, width_g=16, width_d=8) for _ in range(2)]
    with torch.no_grad():
        nets[1][1].weights[0][1].fill_(float("nan"))  # break seed 2's discriminator in the second copy
    results = []
    for gen_net, disc_net, _ in nets:
        opt_g = adg.adam(gen_net.parameters(), 1e-3, (0.9, 0.99), torch.device("cpu"))
        opt_d = adg.adam(disc_net.parameters(), 1e-3, (0.9, 0.99), torch.device("cpu"))
        gen, alive = torch.Generator().manual_seed(0), torch.ones(3, dtype=torch.bool)
        for _ in range(4):
            real, noise = torch.randn(3, 16, 2, generator=gen), torch.randn(3, 16, 2, generator=gen)
            _, _, alive = adg.train_step(gen_net, disc_net, opt_g, opt_d, real, noise, alive, 1.0, 1.0, False)
        results.append((alive, gen_net))
    assert results[0][0].tolist() == [True, True, True]
    assert results[1][0].tolist() == [True, False, True]
    for w_clean, w_broken in zip(results[0][1].weights, results[1][1].weights):  # seeds 1 and 3 unaffected
        torch.testing.assert_close(w_clean[[0, 2]], w_broken[[0, 2]])


def test_dcgan_shapes():
    for size, channels in ((28, 3), (32, 1), (64, 3), (112, 3)):
        gen_net, disc_net = adg.dcgan(size, channels, z_dim=16, width=4)
        images = gen_net(torch.randn(2, 16))
        assert images.shape == (2, channels, size, size)
        assert disc_net(images).shape == (2, 1)


def test_presets_parse_and_cpu_mini_is_small():
    for name, preset in adg.PRESETS.items():
        assert adg.parse_args(["--preset", name]) == preset
    mini = adg.PRESETS["cpu-mini"]
    assert mini.dataset == "ring" and max(mini.layers) <= 2 and mini.num_seeds >= 10 and mini.epochs == 400
    assert mini.alpha_ds == (1.0, 0.5, 0.2) and mini.alpha_gs == (1.0,) and not mini.non_saturating
    assert adg.PRESETS["default"].betas == (0.9, 0.99) and adg.PRESETS["default"].layers == (4, 4)
    assert adg.PRESETS["default"].widths == (400, 200)


# ---------------------------------------------------------------- subprocess runs

def config_results(run_dir) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(run_dir.glob("*/results.json"))}


@pytest.fixture
def run_main(monkeypatch, tmp_path):
    """run_main(*flags) runs the script's main() in this process (one torch thread, no signal handlers installed)
    with --output-dir tmp_path; returns the exit code (0 when main returns)."""
    monkeypatch.setattr(adg.signal, "signal", lambda *_: None)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess runs (and no fight over the cores with other jobs)

    def run(*flags):
        monkeypatch.setattr(sys, "argv", ["alpha_dual_gan.py", *map(str, flags), "--output-dir", str(tmp_path)])
        try:
            adg.main()
        except SystemExit as e:
            return e.code
        return 0

    yield run
    torch.set_num_threads(threads)


def test_ring_grid_smoke(run_main, tmp_path):
    assert run_main(*TINY_RING, "--alpha-ds", "1.0", "0.5", "--alpha-gs", "1.0", "1.2", "--lsgan", "--both-loss-forms",
                    "--epochs", "2", "--run-name", "grid") == 0
    out = tmp_path / "grid"
    result, configs = json.loads((out / "results.json").read_text()), config_results(out)
    assert result["status"] == "finished" and result["args"]["betas"] == [0.9, 0.99]
    assert len(configs) == 9 and "lsgan_lr0.0001" in configs and "ad0.5_ag1.2_clamped_lr0.0001" in configs
    rows = {(r["cell"], r["loss"]): r for r in result["configs"]}
    assert len(rows) == 9 and rows["lsgan", "lsgan"]["seeds"] == 2
    for name, c in configs.items():
        per_seed = c["history"][-1]["per_seed"]
        assert c["status"] == "finished" and len(per_seed) == 2 and all(0 <= r["modes"] <= 8 for r in per_seed)
        row = rows[("lsgan", "lsgan") if c["lsgan"] else (f"({c['alpha_d']:g}, {c['alpha_g']:g})",
                                                          "clamped" if c["clamp_probs"] else "exact")]
        assert row["success"] == sum(r["modes"] == 8 for r in per_seed) and row["diverged"] == 0
        assert row["success_ci95"][0] <= row["success"] / 2 <= row["success_ci95"][1]
        assert list((out / name).glob("events.out.tfevents.*"))
    md = (out / "results.md").read_text()
    for title in ("**success**", "**failure**", "**diverged**", "**mean_hq**", "**median_kl**"):
        assert md.count(title) == 2, title  # one grid per loss form
    assert (out / "alpha_d_sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert md == (out / "table.md").read_text() == adg.summarize(list(configs.values()))  # rebuilt from the files


def test_compiled_run_writes_finished_results(run_main, tmp_path):
    assert run_main(*TINY_RING, "--compile", "--epochs", "2", "--run-name", "compiled") == 0
    out = tmp_path / "compiled"
    result, configs = json.loads((out / "results.json").read_text()), config_results(out)
    assert result["status"] == "finished" and result["args"]["compile"] is True
    assert json.loads((out / "args.json").read_text())["compile"] is True
    (config,) = configs.values()
    assert config["status"] == "finished" and config["steps"] == 4 and config["diverged_at_step"] == [-1, -1]
    assert all(0 <= r["modes"] <= 8 for r in config["history"][-1]["per_seed"])


def test_seed_chunks_run_apart_make_one_row():
    """A sweep may run one cell's 200 seeds as several stacks: summarize() pools their seeds into one row."""
    def run(seeds, statuses):
        per_seed = [dict(seed=s, status=st, modes={"success": 8, "failure": 0}.get(st, 3), hq=0.5, kl=0.1)
                    for s, st in zip(seeds, statuses)]
        return dict(status="finished", experiment="ring", alpha_d=0.5, alpha_g=1.0, lsgan=False, clamp_probs=True,
                    lr=1e-4, history=[dict(epoch=400, step=1, per_seed=per_seed)])
    runs = [run([1, 2], ["success", "failure"]), run([3, 4], ["diverged", "success"])]
    rows = adg.aggregate(runs)
    assert len(rows) == 1 and (rows[0]["seeds"], rows[0]["success"], rows[0]["failure"], rows[0]["diverged"]) == (4, 2, 1, 1)
    assert rows[0]["mean_modes"] == pytest.approx(16 / 3)  # over the 3 finite seeds
    assert "| (0.5, 1) | clamped | 0.0001 | 4 | 50 (" in adg.summarize(runs)
    assert adg.summarize(runs + runs[:1]) == adg.summarize(runs)  # a seed trained by two jobs counts once


def test_reused_run_name_refuses_and_keeps_the_first_run(run_main, tmp_path, capsys):
    args = [*TINY_RING, "--epochs", "1", "--run-name", "same"]
    assert run_main(*args) == 0
    before = {p: p.read_bytes() for p in (tmp_path / "same").rglob("*") if p.is_file()}
    code = run_main(*args)
    assert isinstance(code, str) and code.startswith("error: ") and "already exists" in code and "\n" not in code
    assert {p: p.read_bytes() for p in (tmp_path / "same").rglob("*") if p.is_file()} == before
    code = run_main("--resume", tmp_path / "same")  # a run without --save-model cannot be resumed
    assert code.startswith("error: ") and "--save-model" in code
    assert run_main("--resume", tmp_path / "nothing").startswith("error: ")  # no args.json there
    assert not (tmp_path / "nothing").exists()


def test_non_finite_lr_is_one_line_and_leaves_nothing(run_script, run_main, tmp_path):
    proc = run_script("alpha_dual_gan.py", "--lr", "nan", "--output-dir", tmp_path / "runs", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: --lr is")
    assert run_main("--lr", "inf").startswith("error: --lr is inf")
    assert list(tmp_path.iterdir()) == []  # no run folder, for nan nor inf


def test_every_seed_diverged_exits_3(run_main, tmp_path):
    assert run_main(*TINY_RING, "--epochs", "2", "--lr", "1e30", "--run-name", "boom") == 3
    result = json.loads((tmp_path / "boom" / "results.json").read_text())
    assert result["status"] == "diverged" and result["configs"][0]["diverged"] == 2


LONG_RING = [*TINY_RING[4:], "--num-train", "300", "--batch-size", "2", "--epochs", "4", "--eval-every", "1",
             "--save-model", "--threads", "1"]  # 150 steps per epoch: a checkpoint at each epoch end


def test_ctrl_c_and_kill_then_resume_give_the_uninterrupted_numbers(run_main, tmp_path):
    """Ctrl-C mid-epoch → exit 130, results marked interrupted. A copy of the run folder taken at an epoch-end
    checkpoint stands for a run killed there. Each, resumed with --resume RUN_DIR alone, ends with exactly the results
    and weights of an uninterrupted run."""
    ckpt = "ad0.5_ag1_lr0.0001/checkpoint.pt"
    stopped = subprocess.Popen([sys.executable, str(REPO / "alpha_dual_gan.py"), *LONG_RING, "--output-dir",
                                str(tmp_path), "--run-name", "ctrl_c"], cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    deadline = time.time() + 180
    while not (tmp_path / "ctrl_c" / ckpt).exists():  # training has begun: the first epoch end wrote a checkpoint
        assert stopped.poll() is None and time.time() < deadline, stopped.communicate()
        time.sleep(0.02)
    shutil.copytree(tmp_path / "ctrl_c", tmp_path / "killed")  # checkpoint.pt is replaced atomically: a whole one
    stopped.send_signal(signal.SIGINT)
    stdout, stderr = stopped.communicate(timeout=300)
    assert stopped.returncode == 130 and "Traceback" not in stderr and "--resume" in stdout, (stdout, stderr)
    assert json.loads((tmp_path / "ctrl_c" / "results.json").read_text())["status"] == "interrupted"
    assert (tmp_path / "ctrl_c" / "results.md").read_text().startswith("**Status: interrupted")
    assert 150 < torch.load(tmp_path / "ctrl_c" / ckpt, weights_only=False)["step"] < 600
    assert torch.load(tmp_path / "ctrl_c" / ckpt, weights_only=False)["step"] % 150 != 0  # Ctrl-C came mid-epoch
    assert torch.load(tmp_path / "killed" / ckpt, weights_only=False)["step"] % 150 == 0  # an epoch-end checkpoint
    assert run_main(*LONG_RING, "--run-name", "straight") == 0
    for name in ("ctrl_c", "killed"):
        assert run_main("--resume", tmp_path / name) == 0
        straight, resumed = config_results(tmp_path / "straight"), config_results(tmp_path / name)
        for key in ("status", "steps", "history", "diverged_at_step"):
            assert resumed["ad0.5_ag1_lr0.0001"][key] == straight["ad0.5_ag1_lr0.0001"][key], (name, key)
        a, b = (torch.load(tmp_path / d / ckpt, weights_only=False)["states"][0] for d in ("straight", name))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_image_path_on_stacked_mnist(run_main, tmp_path, mnist_root):
    assert run_main("--preset", "stacked-mnist", "--num-seeds", "2", "--epochs", "2", "--eval-every", "1", "--alpha-ds",
                    "0.6", "--no-lsgan", "--lr-sweep", "3e-4", "--batch-size", "64", "--z-dim", "8", "--model-width",
                    "4", "--fid-samples", "64", "--data-root", mnist_root, "--run-name", "img") == 0
    out = tmp_path / "img"
    configs, result = config_results(out), json.loads((out / "results.json").read_text())
    assert len(configs) == 4 and {c["lr"] for c in configs.values()} == {1e-4, 3e-4}
    for c in configs.values():
        assert c["status"] == "finished" and [e["epoch"] for e in c["history"]] == [1, 2]
        assert c["history"][-1]["extractor"].startswith("digits") and 1 <= c["history"][-1]["modes"] <= 1000
    row = next(r for r in result["configs"] if r["cell"] == "(0.6, 1)" and r["lr"] == 3e-4)
    fids = [configs[f"ad0.6_ag1_clamped_lr0.0003_seed{s}"]["history"][-1]["fid"] for s in (1, 2)]
    assert row["fid_mean"] == pytest.approx(np.mean(fids)) and row["fid_std"] == pytest.approx(np.std(fids))
    assert row["per_epoch"]["2"][0] == pytest.approx(np.mean(fids))
    for name in ("fid_over_lr.png", "fid_over_epoch.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_help_shows_concrete_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit_info:
        adg.parse_args(["--preset", "cpu-mini", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--clamp-probs" in out and "(default: 0.9 0.99)" in out
    assert "(default: 1 1)" in out and "(default: 1.0 0.5 0.2)" in out and "(default: None)" not in out.split("--run-name")[0]
