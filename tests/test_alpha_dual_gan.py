"""Tests of alpha_dual_gan.py: α-loss against closed forms, the tilted optimal discriminator by numerical
minimisation, the ring metrics on hand-built sets, stacked training against plain nn.Linear + Adam per seed,
operator counts independent of the stack size, masking of a non-finite seed, and subprocess smoke runs."""
import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

import alpha_dual_gan as adg

ALPHAS = [0.3, 0.5, 0.9, 1.2, 2.0, 10.0]


def direct_alpha_loss(y: int, prob: np.ndarray, alpha: float) -> np.ndarray:
    """The paper's formula on probabilities, in numpy float64."""
    e = (alpha - 1) / alpha
    return alpha / (alpha - 1) * (1 - y * prob ** e - (1 - y) * (1 - prob) ** e)


# ---------------------------------------------------------------- α-loss

def test_alpha_one_is_binary_cross_entropy():
    z = torch.linspace(-20, 20, 101, dtype=torch.float64)
    for y in (0, 1):
        bce = F.binary_cross_entropy_with_logits(z, torch.full_like(z, y), reduction="none")
        torch.testing.assert_close(adg.alpha_loss(z, y, 1.0), bce)
        # continuity: α → 1 from both sides approaches the log-loss
        for alpha in (1 - 1e-6, 1 + 1e-6):
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
        got = adg.alpha_loss(torch.tensor(z), y, alpha).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
        # the authors' clamped form is the same function away from the clamp
        clamped = adg.alpha_loss(torch.tensor(z), y, alpha, clamp_probs=True).numpy()
        np.testing.assert_allclose(clamped, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("alpha", [0.3, 0.5, 1.0, 1.2, 2.0, math.inf])
def test_gradients_finite_at_saturated_logits(alpha):
    for y in (0, 1):
        z = torch.tensor([-30.0, -10.0, 0.0, 10.0, 30.0], requires_grad=True)  # float32, as in training
        loss = adg.alpha_loss(z, y, alpha)
        (grad,) = torch.autograd.grad(loss.sum(), z)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), (alpha, y, loss, grad)
        wrong = 0 if y == 1 else -1  # the confidently wrong logit (−30 for a real, +30 for a fake)
        assert grad[wrong].abs() > 0, "the stable form keeps a gradient where D is confidently wrong"
        # the authors' clamp: σ(z) clamped to [1e-7, 1 − 1e-7] has zero gradient at the saturated logit
        z2 = z.detach().clone().requires_grad_(True)
        (grad2,) = torch.autograd.grad(adg.alpha_loss(z2, y, alpha, clamp_probs=True).sum(), z2)
        assert grad2[wrong] == 0


def test_nonpositive_alpha_rejected():
    for alpha in (0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="α must be in"):
            adg.alpha_loss(torch.zeros(3), 1, alpha)
    with pytest.raises(SystemExit, match="α must be in"):
        adg.Args(alpha_ds=(0.5, 0.0))
    with pytest.raises(SystemExit, match="α must be in"):
        adg.Args(alpha_gs=(-1.0,))
    with pytest.raises(SystemExit, match="lr"):
        adg.Args(lr=-1e-4)


def test_objectives_reduce_to_vanilla_and_lsgan():
    d_real, d_fake = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    log_d = F.logsigmoid
    vanilla_d = -(log_d(d_real).mean(-1) + log_d(-d_fake).mean(-1))
    torch.testing.assert_close(adg.discriminator_loss(d_real, d_fake, 1.0), vanilla_d)
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
        expected = p_r ** alpha / (p_r ** alpha + p_g ** alpha)
        assert abs(1 / (1 + math.exp(-z_star)) - expected) < 1e-5
        got = adg.optimal_discriminator(torch.tensor(p_r, dtype=torch.float64), torch.tensor(p_g, dtype=torch.float64),
                                        alpha)
        assert abs(float(got) - expected) < 1e-12


# ---------------------------------------------------------------- ring metrics

def ring_centers():
    i = torch.arange(1, 9, dtype=torch.float64)
    return torch.stack([torch.cos(2 * math.pi * i / 8), torch.sin(2 * math.pi * i / 8)], 1).float()


def test_ring_metrics_on_hand_built_sets():
    centers, std = ring_centers(), 0.01
    real_counts = torch.full((8,), 100)
    all_modes = centers.repeat(10, 1)                                    # 10 samples exactly on every mode
    one_mode = centers[3].expand(80, 2).clone()                          # all 80 on mode 3
    far = 2 * centers[0].expand(80, 2).clone()                           # nearest mode 0, but 1.0 away
    offset = torch.tensor([0.02, 0.0])
    half_close = torch.cat([(centers[1] + offset).expand(40, 2), (centers[2] + 2.5 * offset).expand(40, 2)])
    broken = all_modes.clone()
    broken[5, 0] = float("nan")
    m = adg.ring_metrics(torch.stack([all_modes, one_mode, far, half_close, broken]), centers, std, real_counts)
    assert m["modes"].tolist() == [8, 1, 0, 1, 0]
    np.testing.assert_allclose(m["hq"].numpy(), [1.0, 1.0, 0.0, 0.5, 0.0], atol=1e-6)
    # KL(P_real ‖ P_fake), P_real uniform, P_fake = (counts + 1) / (80 + 8)
    kl_one = 1 / 8 * math.log((1 / 8) / (81 / 88)) + 7 / 8 * math.log((1 / 8) / (1 / 88))
    kl_half = 2 / 8 * math.log((1 / 8) / (41 / 88)) + 6 / 8 * math.log((1 / 8) / (1 / 88))
    np.testing.assert_allclose(m["kl"][:4].numpy(), [0.0, kl_one, kl_one, kl_half], rtol=1e-6, atol=1e-9)
    assert math.isnan(m["kl"][4]) and not m["finite"][4]


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
    gen_net, disc_net, _ = adg.ring_networks(seeds, width_g=24, width_d=16)
    for s, seed in enumerate(seeds):  # a seed's init does not depend on its stack neighbours
        alone_g, alone_d, _ = adg.ring_networks([seed], width_g=24, width_d=16)
        for p, q in zip([*gen_net.parameters(), *disc_net.parameters()], [*alone_g.parameters(), *alone_d.parameters()]):
            assert torch.equal(p[s], q[0])
    refs = [(reference_mlp(gen_net, s, 0.0), reference_mlp(disc_net, s, 0.2)) for s in range(len(seeds))]
    opt_g = adg.adam(gen_net.parameters(), 1e-3, (0.9, 0.999), torch.device("cpu"))
    opt_d = adg.adam(disc_net.parameters(), 1e-3, (0.9, 0.999), torch.device("cpu"))
    ref_opts = [(torch.optim.Adam(g.parameters(), lr=1e-3), torch.optim.Adam(d.parameters(), lr=1e-3)) for g, d in refs]
    gen = torch.Generator().manual_seed(0)
    alive = torch.ones(len(seeds), dtype=torch.bool)
    for _ in range(steps):
        real = torch.randn(len(seeds), batch, 2, generator=gen)
        noise = torch.randn(len(seeds), batch, 2, generator=gen)
        _, _, alive = adg.ring_train_step(gen_net, disc_net, opt_g, opt_d, real, noise, alive, alpha_d, alpha_g,
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
    opt_g = adg.adam(gen_net.parameters(), 1e-4, (0.9, 0.999), torch.device("cpu"))
    opt_d = adg.adam(disc_net.parameters(), 1e-4, (0.9, 0.999), torch.device("cpu"))
    real, noise = torch.randn(num_seeds, 32, 2), torch.randn(num_seeds, 32, 2)
    alive = torch.ones(num_seeds, dtype=torch.bool)
    for _ in range(2):  # warm-up (Adam creates its state on the first step)
        adg.ring_train_step(gen_net, disc_net, opt_g, opt_d, real, noise, alive, 0.5, 1.0, False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        adg.ring_train_step(gen_net, disc_net, opt_g, opt_d, real, noise, alive, 0.5, 1.0, False)
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def test_operator_calls_do_not_grow_with_stack_size():
    counts = {n: count_ops_per_step(n) for n in (1, 4, 16)}
    assert counts[1] > 20 and len(set(counts.values())) == 1, counts


def test_non_finite_seed_is_masked_and_others_continue():
    seeds = [1, 2, 3]
    nets = [adg.ring_networks(seeds, width_g=16, width_d=8) for _ in range(2)]
    with torch.no_grad():
        nets[1][1].weights[0][1].fill_(float("nan"))  # break seed 2's discriminator in the second copy
    results = []
    for gen_net, disc_net, _ in nets:
        opt_g = adg.adam(gen_net.parameters(), 1e-3, (0.9, 0.999), torch.device("cpu"))
        opt_d = adg.adam(disc_net.parameters(), 1e-3, (0.9, 0.999), torch.device("cpu"))
        gen, alive = torch.Generator().manual_seed(0), torch.ones(3, dtype=torch.bool)
        for _ in range(4):
            real, noise = torch.randn(3, 16, 2, generator=gen), torch.randn(3, 16, 2, generator=gen)
            _, _, alive = adg.ring_train_step(gen_net, disc_net, opt_g, opt_d, real, noise, alive, 1.0, 1.0, False)
        results.append((alive, gen_net))
    assert results[0][0].tolist() == [True, True, True]
    assert results[1][0].tolist() == [True, False, True]
    for w_clean, w_broken in zip(results[0][1].weights, results[1][1].weights):  # seeds 1 and 3 unaffected
        torch.testing.assert_close(w_clean[[0, 2]], w_broken[[0, 2]])


def test_dcgan_shapes():
    for size, channels in ((28, 3), (32, 1), (64, 3), (112, 3)):
        gen_net, disc_net = adg.dcgan(size, channels, nz=16, ngf=4, ndf=4)
        images = gen_net(torch.randn(2, 16))
        assert images.shape == (2, channels, size, size)
        assert disc_net(images).shape == (2,)
    assert adg.dcgan_base(112) == 7 and adg.dcgan_base(64) == 4 and adg.dcgan_base(48) is None


# ---------------------------------------------------------------- subprocess runs

def test_ring_grid_smoke(run_script, tmp_path):
    run_script("alpha_dual_gan.py", "--alpha-ds", "1.0", "0.5", "--alpha-gs", "1.0", "1.2", "--lsgan",
               "--num-seeds", "3", "--max-steps", "4", "--epochs", "1", "--ring-width-g", "16", "--ring-width-d", "8",
               "--log-every", "2", "--scatter-seeds", "2", "--save-model", "--output-dir", str(tmp_path),
               "--run-name", "grid", cwd=tmp_path, timeout=300)
    out = tmp_path / "grid"
    for name in ("grid_heatmap.png", "alpha_d_sweep.png", "grid_tables.md", "results.md", "scatter_vanilla.png",
                 "checkpoint_lsgan.pt"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "grid_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    with open(out / "grid_success_rate.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["α_G \\ α_D", "1", "0.5"] and [r[0] for r in rows[1:]] == ["1", "1.2"]
    assert all(0 <= float(v) <= 100 for r in rows[1:] for v in r[1:])
    with open(out / "per_seed.csv") as f:
        per_seed = list(csv.DictReader(f))
    assert len(per_seed) == 5 * 3 and {r["cell"] for r in per_seed} == {"vanilla", "(0.5,1)", "(1,1.2)", "(0.5,1.2)", "lsgan"}
    assert all(0 <= int(r["modes"]) <= 8 for r in per_seed)
    result = json.loads((out / "results.json").read_text())
    assert len(result["cells"]) == 5 and all(c["seeds"] == 3 and c["epochs"] > 0 for c in result["cells"])
    for c in result["cells"]:
        rows_c = [r for r in per_seed if r["cell"] == c["cell"]]
        assert c["success_rate"] == pytest.approx(sum(int(r["modes"]) == 8 for r in rows_c) / 3)
    assert list(out.glob("events.out.tfevents.*"))


def test_resume_continues_the_run(run_script, tmp_path):
    """2 epochs in one go == 1 epoch, then --resume to 2 epochs (same seeds, same shuffles, same numbers)."""
    common = ["--alpha-ds", "0.5", "--num-seeds", "2", "--ring-width-g", "8", "--ring-width-d", "4", "--batch-size",
              "5000", "--eval-every", "1", "--save-model", "--scatter-seeds", "1", "--output-dir", str(tmp_path)]
    run_script("alpha_dual_gan.py", *common, "--epochs", "2", "--run-name", "straight", cwd=tmp_path, timeout=300)
    run_script("alpha_dual_gan.py", *common, "--epochs", "1", "--run-name", "split", cwd=tmp_path, timeout=300)
    proc = run_script("alpha_dual_gan.py", *common, "--epochs", "2", "--run-name", "split", "--resume", cwd=tmp_path,
                      timeout=300)
    assert "resumed" in proc.stdout
    straight = torch.load(tmp_path / "straight" / "checkpoint_(0.5,1).pt", weights_only=False)
    split = torch.load(tmp_path / "split" / "checkpoint_(0.5,1).pt", weights_only=False)
    assert straight["step"] == split["step"] == 2 * 10
    for key in ("generator", "discriminator"):
        for name, value in straight[key].items():
            torch.testing.assert_close(split[key][name], value, rtol=0, atol=0)
    assert (tmp_path / "straight" / "per_seed.csv").read_text() == (tmp_path / "split" / "per_seed.csv").read_text()


def test_image_path_smoke_on_fake_data(run_script, tmp_path):
    run_script("alpha_dual_gan.py", "--dataset", "fake", "--non-saturating", "--alpha-ds", "0.6", "--lsgan",
               "--num-seeds", "2", "--max-steps", "3", "--batch-size", "16", "--nz", "8", "--ngf", "4", "--ndf", "4",
               "--fid-samples", "64", "--data-root", str(tmp_path / "data"), "--output-dir", str(tmp_path),
               "--run-name", "img", cwd=tmp_path, timeout=300)
    out = tmp_path / "img"
    result = json.loads((out / "results.json").read_text())
    assert len(result["runs"]) == 4 and {r["cell"] for r in result["runs"]} == {"(0.6,1)", "lsgan"}
    for r in result["runs"]:
        assert r["status"] == "ok" and r["steps"] == 3
        assert math.isfinite(r["curve"][-1]["fid"]) and 1 <= r["curve"][-1]["modes"] <= 10
    assert (out / "samples_across_seeds.png").read_bytes()[:4] == b"\x89PNG"
    assert "digits-cnn" in result["fid_name"]


def test_help(run_script, tmp_path):
    proc = run_script("alpha_dual_gan.py", "--help", cwd=tmp_path, timeout=120)
    assert "--alpha-ds" in proc.stdout and "--non-saturating" in proc.stdout
