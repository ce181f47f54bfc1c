"""Tests of adaptive_wgan.py: the decision rule, the Dirac-GAN closed forms, weight clipping, the gradient penalty,
and subprocess smoke runs that check what a run writes."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from adaptive_wgan import (AdaptiveRule, Args, DCGANCritic, DCGANGenerator, GulrajaniCritic, GulrajaniGenerator,
                           change_ratio, clip_weights, critic_step, dirac_critic_step, dirac_generator_step,
                           dirac_losses, evaluate_losses, fixed_critic_turn, gradient_penalty, loop_iteration,
                           make_optimizer, run_dirac, sequence_stats, train_run)

# ---------------------------------------------------------------- the decision rule


def test_first_two_steps_go_to_the_generator_with_lambda_one():
    rule = AdaptiveRule(lam=1.0)
    assert rule.r_g == rule.r_d == 1.0
    assert not rule.critic_turn()          # 1 > 1·1 is false: step 1 is G
    rule.observe(2.0, -3.0)                # first iteration: L_prev := L, both ratios 0
    assert rule.r_g == rule.r_d == 0.0
    assert not rule.critic_turn()          # 0 > 0 is false: step 2 is G
    rule.observe(2.0, -3.3)                # only L_d moved
    assert rule.r_d == pytest.approx(0.1) and rule.r_g == 0.0
    assert rule.critic_turn()


def test_ties_go_to_the_generator_and_the_comparison_is_strict():
    rule = AdaptiveRule(lam=2.0)
    rule.r_d, rule.r_g = 0.5, 0.25         # r_d == λ·r_g exactly (binary fractions)
    assert not rule.critic_turn()
    rule.r_d = np.nextafter(0.5, 1.0)
    assert rule.critic_turn()


def test_ratio_against_hand_values_and_sign_blindness():
    assert change_ratio(1.5, 1.0, 1e-12) == pytest.approx(0.5)
    assert change_ratio(-1.5, -1.0, 1e-12) == pytest.approx(0.5)   # eq. (4) ignores the overall sign
    assert change_ratio(0.5, -1.0, 1e-12) == pytest.approx(1.5)


def test_zero_previous_loss_does_not_divide_by_zero():
    rule = AdaptiveRule(lam=1.0, eps=1e-12)
    rule.observe(0.0, 0.0)
    rule.observe(0.25, 0.0)                # L_g^p = 0: guarded by ε
    assert math.isfinite(rule.r_g) and rule.r_g == pytest.approx(0.25 / 1e-12)
    assert rule.r_d == 0.0                 # 0/ε
    assert not rule.critic_turn()


def stale_dirac_run(steps: int, h: float = 0.05) -> int:
    """The bug the notes warn about: only the stepped network's loss is refreshed. Returns u_d."""
    theta, psi = 1.5, 0.5
    rule, loss_g, loss_d, u_d = AdaptiveRule(1.0), None, None, 0
    for _ in range(steps):
        critic = rule.critic_turn()
        if critic:
            theta, psi = dirac_critic_step(theta, psi, h, 0.5)
            loss_d = dirac_losses(theta, psi)[1]
            u_d += 1
        else:
            theta, psi = dirac_generator_step(theta, psi, h)
            loss_g = dirac_losses(theta, psi)[0]
        loss_d = dirac_losses(1.5, 0.5)[1] if loss_d is None else loss_d
        rule.observe(loss_g, loss_d)
    return u_d


def test_both_losses_refresh_every_iteration():
    # A rule that refreshed only the stepped network would see r_d = 0 forever and step G forever.
    assert stale_dirac_run(500) == 0
    traj = run_dirac("adaptive", 500, h=0.05, lam=1.0)
    turns = traj["critic_turns"]
    assert list(turns[:3]) == [False, False, True]   # G, G by the guards, then r_d = 0.0476 > r_g = 0.0164
    assert 100 < turns.sum() < 400


def test_loop_iteration_returns_both_losses_with_current_weights():
    torch.manual_seed(0)
    G, D = GulrajaniGenerator(8, 4, 1, 8), GulrajaniCritic(4, 1, 8)
    opt_g, opt_d = make_optimizer("wgan-gp", G.parameters(), 1e-2, "cpu"), make_optimizer("wgan-gp", D.parameters(), 1e-2, "cpu")
    real, z, alpha = torch.rand(16, 1, 8, 8) * 2 - 1, torch.randn(16, 8), torch.rand(16, 1, 1, 1)
    before = evaluate_losses(G, D, real, z, alpha, "wgan-gp", 10.0)
    for critic in (False, True):
        after = loop_iteration(G, D, opt_g, opt_d, real, z, alpha, critic, "wgan-gp", 0.01, 10.0, evaluate=True)
        with torch.no_grad():
            fake = G(z)
            fake_score, real_score = D(fake).mean(), D(real).mean()
        gp = gradient_penalty(D, real, fake, alpha, create_graph=False)
        assert after[0].item() == pytest.approx(-fake_score.item(), rel=1e-5, abs=1e-6)
        assert after[1].item() == pytest.approx((fake_score - real_score + 10 * gp).item(), rel=1e-5, abs=1e-6)
        assert (after[:2] != before[:2]).all()    # a G step changes L_d too, a D step changes L_g too
        before = after


def test_fixed_schedule_and_sequence_stats():
    turns = [fixed_critic_turn(i, 5, 1) for i in range(12)]
    assert turns == [True] * 5 + [False] + [True] * 5 + [False]
    stats = sequence_stats(turns)
    assert (stats["u_d"], stats["u_g"], stats["switches"], stats["longest_d_run"], stats["longest_g_run"]) == (10, 2, 3, 5, 1)
    assert [fixed_critic_turn(i, 1, 1) for i in range(4)] == [True, False, True, False]


# ---------------------------------------------------------------- Dirac-GAN


def test_dirac_updates_match_the_gradient_of_the_objective():
    # L(θ, ψ) = ψ·1 − ψ·θ (eq. 8): G descends L in θ, D ascends L in ψ; gradients from autograd, not the code
    h = 0.1
    for theta0, psi0 in [(1.5, 0.5), (0.3, -0.2), (1.0, 0.0), (-2.0, 0.4)]:
        theta, psi = torch.tensor(theta0, dtype=torch.float64, requires_grad=True), torch.tensor(psi0, dtype=torch.float64, requires_grad=True)
        g_theta, g_psi = torch.autograd.grad(psi - psi * theta, (theta, psi))
        assert dirac_generator_step(theta0, psi0, h) == pytest.approx((theta0 - h * g_theta.item(), psi0))
        expected_psi = float(np.clip(psi0 + h * g_psi.item(), -0.5, 0.5))
        assert dirac_critic_step(theta0, psi0, h, 0.5) == pytest.approx((theta0, expected_psi))
        assert dirac_losses(theta0, psi0) == pytest.approx((psi0 * theta0, psi0 * (1 - theta0)))


def test_dirac_clipping_holds_psi():
    assert dirac_critic_step(-1.0, 0.45, 0.1, 0.5)[1] == 0.5      # 0.45 + 0.2 clipped
    assert dirac_critic_step(3.0, -0.45, 0.1, 0.5)[1] == -0.5
    for strategy in ("fixed", "adaptive"):
        traj = run_dirac(strategy, 3000, h=0.1)
        assert np.abs(traj["psi"]).max() <= 0.5


@pytest.mark.parametrize("h", [0.01, 0.05])
def test_fixed_five_to_one_does_not_reach_the_equilibrium(h):
    """Bound: with u = θ − 1, v = ψ, the 5:1 schedule is (as h → 0) the flow u' = v/6, v' = −5u/6, which conserves
    H = 5u²/6 + v²/6 while |v| < 0.5. Clipping holds v at ±0.5 only while the flow pushes outwards, i.e. until u crosses
    0, so every clipped stretch ends at (0, ±0.5) with H = 1/24, and H never falls below 1/24. On H ≥ 1/24,
    u² + v² ≥ 6H/5 ≥ 1/20, so the distance to (1, 0) stays ≥ 1/√20 ≈ 0.2236. The discrete map adds O(h); 0.2 leaves room."""
    traj = run_dirac("fixed", int(250 / h), h=h)
    dist = np.hypot(traj["theta"] - 1, traj["psi"])
    assert dist.min() > 0.2
    assert dist[len(dist) // 2:].min() < 0.2236 + 0.01   # and the limit cycle really is that close (bound is tight)


# ---------------------------------------------------------------- networks, clipping, penalty


def test_network_shapes():
    z = torch.randn(3, 100)
    assert DCGANGenerator(100, 8, 3, 64)(z).shape == (3, 3, 64, 64)
    assert DCGANCritic(8, 3, 64)(torch.randn(3, 3, 64, 64)).shape == (3,)
    assert GulrajaniGenerator(128, 8, 3, 32)(torch.randn(3, 128)).shape == (3, 3, 32, 32)
    assert GulrajaniCritic(8, 3, 32)(torch.randn(3, 3, 32, 32)).shape == (3,)


def test_weight_clipping_keeps_every_critic_parameter_in_range():
    torch.manual_seed(0)
    G, D = DCGANGenerator(16, 4, 1, 16), DCGANCritic(4, 1, 16)
    opt_d = make_optimizer("wgan-clip", D.parameters(), 0.5, "cpu")   # a large lr: the step leaves the box
    c = 0.01
    for _ in range(3):
        critic_step(G, D, opt_d, torch.rand(8, 1, 16, 16) * 2 - 1, torch.randn(8, 16), None, "wgan-clip", c, 0.0)
    values = torch.cat([p.detach().flatten() for p in D.parameters()])
    assert values.abs().max() <= c
    assert (values.abs() == c).float().mean() > 0.5     # clipping was active (batch-norm scales included)
    w = nn.Linear(3, 3)
    nn.init.constant_(w.weight, 2.0)
    clip_weights(w, 0.1)
    assert (w.weight == 0.1).all()


def test_gradient_penalty_equals_independent_computations():
    torch.manual_seed(0)
    D = GulrajaniCritic(4, 3, 8).double()
    real, fake, alpha = torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.randn(5, 3, 8, 8, dtype=torch.float64), \
        torch.rand(5, 1, 1, 1, dtype=torch.float64)
    expected = []
    for i in range(5):   # one sample at a time, central finite differences of D at x̂_i
        x_hat = (alpha[i] * real[i] + (1 - alpha[i]) * fake[i]).flatten()
        grad = torch.zeros_like(x_hat)
        for j in range(len(x_hat)):
            e = torch.zeros_like(x_hat)
            e[j] = 1e-6
            with torch.no_grad():
                grad[j] = (D((x_hat + e).view(1, 3, 8, 8)) - D((x_hat - e).view(1, 3, 8, 8))).item() / 2e-6
        expected.append((grad.norm() - 1) ** 2)
    assert gradient_penalty(D, real, fake, alpha).item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-6)
    # a linear critic D(x) = w·x + b has ∇D = w everywhere: GP = (‖w‖ − 1)²
    lin = nn.Sequential(nn.Flatten(), nn.Linear(12, 1))
    w = lin[1].weight.detach()
    gp = gradient_penalty(lin, torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2), torch.rand(4, 1, 1, 1))
    assert gp.item() == pytest.approx(((w.norm() - 1) ** 2).item(), rel=1e-5)


def test_bad_arguments_fail_with_a_message():
    for kwargs, text in [({"lam": 0.0}, "λ must be positive"), ({"dataset": "imagenet"}, "unknown dataset"),
                         ({"lr": -1.0}, "--lr must be positive"), ({"image_size": 48}, "power-of-two"),
                         ({"fid_extractor": "digits"}, "digits covers"), ({"strategy": "fixed", "lams": [1.0]}, "--lams")]:
        with pytest.raises(SystemExit, match=text):
            Args(**kwargs)


# ---------------------------------------------------------------- subprocess smoke runs

TINY = ["--width", "8", "--batch-size", "32", "--log-every", "5", "--output-dir", "runs"]


def test_smoke_fake_adaptive_writes_counts_and_fid(run_script, tmp_path):
    run_script("adaptive_wgan.py", "--lam", "3", "--dataset", "fake", "--image-size", "16", "--epochs", "2",
               "--fid-extractor", "digits", "--fid-samples", "128", "--data-root", tmp_path / "data",
               "--run-name", "fake", *TINY, cwd=tmp_path)
    out = tmp_path / "runs" / "fake"
    res = json.loads((out / "results.json").read_text())
    assert res["strategy"] == "adaptive" and res["lam"] == 3.0
    assert res["u_g"] + res["u_d"] == res["iterations"] == 2 * 16   # ⌈512 / 32⌉ loop iterations per epoch
    assert res["u_g"] >= 2                                           # the guards make the first two steps G
    assert [h["epoch"] for h in res["history"]] == [1, 2] and all(h["fid"] > 0 for h in res["history"])
    assert set(res["reached_epoch"]) == {"200", "100", "50", "40"} and res["best_fid"] == min(h["fid"] for h in res["history"])
    assert "FID[digits-cnn(fake), 128 real / 128 fake]" in (out / "results.md").read_text()
    assert "| u_g | u_d |" in (out / "results.md").read_text()
    assert list(out.glob("events.out.tfevents.*")) and (out / "samples" / "epoch_0002.png").exists()


def test_smoke_dirac_writes_figure_and_distances(run_script, tmp_path):
    proc = run_script("adaptive_wgan.py", "--dataset", "dirac", "--dirac-steps", "2000", "--output-dir", "runs",
                      "--run-name", "dirac", cwd=tmp_path)
    out = tmp_path / "runs" / "dirac"
    res = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in res["runs"]]
    assert labels == ["fixed 5:1", "adaptive λ=1"]
    fixed = res["runs"][0]
    assert (fixed["u_g"], fixed["u_d"]) == (333, 1667) and fixed["final_distance"] > 0.2
    for r in res["runs"]:
        assert r["u_g"] + r["u_d"] == 2000 and r["final_distance"] >= 0
    assert (out / "dirac_phase_plane.png").stat().st_size > 10_000
    assert "distance to (1, 0)" in proc.stdout and "final_distance" in (out / "results.md").read_text()


def test_smoke_cifar10_folder_design_card_example(run_script, tmp_path, cifar_root):
    # the design card's `--lam 3 --dataset cifar10` on a tiny CIFAR-10-format folder (64×64 DCGAN, FID off: no weights)
    run_script("adaptive_wgan.py", "--lam", "3", "--dataset", "cifar10", "--data-root", cifar_root, "--epochs", "2",
               "--fid-every", "0", "--sample-every", "1", "--save-model", "--run-name", "cifar", *TINY, cwd=tmp_path)
    out = tmp_path / "runs" / "cifar"
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"] == "cifar10" and res["iterations"] == 2 * 7 and res["u_g"] + res["u_d"] == 14
    assert res["best_fid"] is None and res["fid_name"] is None
    from PIL import Image
    assert Image.open(out / "samples" / "epoch_0001.png").size == (8 * 64 + 9 * 2, 8 * 64 + 9 * 2)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["state"]["iteration"] == 14 and ckpt["lam"] == 3.0
    params = [v for k, v in ckpt["D"].items() if k.endswith(("weight", "bias"))]
    assert len(params) >= 5 and all(v.abs().max() <= 0.01 for v in params)   # clipping held through training


def test_smoke_comparison_on_equal_budgets(run_script, tmp_path):
    common = ["--dataset", "fake", "--loss", "wgan-gp", "--image-size", "16", "--fid-every", "0",
              "--data-root", tmp_path / "data", *TINY]
    run_script("adaptive_wgan.py", *common, "--epochs", "1", "--strategies", "fixed", "adaptive", "ttur",
               "--lams", "1", "3", "--run-name", "cmp", cwd=tmp_path)
    out = tmp_path / "runs" / "cmp"
    rows = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in rows] == ["fixed_5-1", "adaptive_lam1", "adaptive_lam3", "ttur"]
    assert all(r["u_g"] + r["u_d"] == 16 for r in rows)                 # equal budgets
    assert rows[0]["u_d"] == 14 and rows[3]["u_d"] == 8                  # 5:1 and 1:1 schedules
    table = (out / "results.md").read_text()
    assert "| adaptive WGAN-GP | λ = 3 |" in table and "| WGAN-GP TTUR |" in table and (out / "results.csv").exists()


def test_resume_continues_the_run_exactly(tmp_path):
    from common.datasets import load_dataset
    images = load_dataset("fake", image_size=16, root=tmp_path / "data").x
    kwargs = dict(dataset="fake", loss="wgan-clip", image_size=16, width=4, batch_size=32, fid_every=0, log_every=5,
                  save_model=True)
    full = train_run(Args(epochs=2, **kwargs), "adaptive", 1.0, images, None, tmp_path / "full", torch.device("cpu"))
    train_run(Args(epochs=1, **kwargs), "adaptive", 1.0, images, None, tmp_path / "part", torch.device("cpu"))
    (tmp_path / "part" / "results.json").unlink()                         # as if interrupted after epoch 1
    resumed = train_run(Args(epochs=2, resume=str(tmp_path / "part"), **kwargs), "adaptive", 1.0, images, None,
                        tmp_path / "part", torch.device("cpu"))
    assert (resumed["u_g"], resumed["u_d"], resumed["iterations"]) == (full["u_g"], full["u_d"], 32)
    g_full, g_resumed = (torch.load(tmp_path / d / "generator.pt") for d in ("full", "part"))
    assert all(torch.equal(g_full[k], g_resumed[k]) for k in g_full)


def test_non_finite_loss_stops_the_run_cleanly(tmp_path):
    from common.datasets import load_dataset
    images = load_dataset("fake", image_size=16, root=tmp_path / "data").x
    args = Args(dataset="fake", loss="wgan-gp", image_size=16, width=4, batch_size=16, iterations=40, fid_every=0,
                lr=1e30, log_every=10)
    for strategy in ("adaptive", "fixed"):
        res = train_run(args, strategy, 1.0, images, None, tmp_path / strategy, torch.device("cpu"))
        assert res["diverged"] and "non-finite" in res["reason"] and res["iterations"] < 40
        assert json.loads((tmp_path / strategy / "results.json").read_text())["diverged"]


def test_help(run_script, tmp_path):
    proc = run_script("adaptive_wgan.py", "--help", cwd=tmp_path)
    assert "--lam" in proc.stdout and "--strategies" in proc.stdout
