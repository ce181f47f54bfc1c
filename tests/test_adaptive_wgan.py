"""Tests of adaptive_wgan.py: the decision rule and its tie tolerance, the Dirac-GAN closed forms, weight clipping, the
two gradient penalties, the configurations of the paper's tables, the table built from results.json, and the run
lifecycle (run folders, bad input, Ctrl-C, resume) checked on what a run writes."""
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import adaptive_wgan as aw
from adaptive_wgan import (PRESETS, Args, build_models, change_ratios, clip_weights, configurations, critic_turn,
                           dirac_step, evaluate_losses, fixed_critic_turn, gan_losses, gradient_penalty, parse_args,
                           run_dirac, summarize, validate)
from conftest import REPO, skip_if_medium_changed_nothing, skip_unless_medium_reduces_matmuls, StopAfter


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the decision rule


def test_first_two_steps_go_to_the_generator_with_lambda_one():
    r_g = r_d = 1.0                                   # Algorithm 1 initialises both ratios to 1
    assert not critic_turn(r_d, r_g, 1.0)             # 1 > 1·1 is false: step 1 is G
    r_g, r_d = change_ratios((2.0, -3.0), None)       # first iteration: L_prev := L, both ratios 0
    assert (r_g, r_d) == (0.0, 0.0) and not critic_turn(r_d, r_g, 1.0)   # step 2 is G
    r_g, r_d = change_ratios((2.0, -3.3), (2.0, -3.0))                   # only L_d moved
    assert r_d == pytest.approx(0.1) and r_g == 0.0 and critic_turn(r_d, r_g, 1.0)


def test_ties_step_the_generator_within_the_relative_tolerance():
    assert not critic_turn(0.5, 0.25, 2.0, tie_tol=0.0)                  # r_d == λ·r_g exactly: strict comparison
    assert critic_turn(np.nextafter(0.5, 1.0), 0.25, 2.0, tie_tol=0.0)   # without tolerance one ulp decides
    assert not critic_turn(0.5 * (1 + 5e-7), 0.25, 2.0)                  # within 1e-6 relative: a tie, G steps
    assert critic_turn(0.5 * (1 + 2e-6), 0.25, 2.0)                      # beyond it: the critic steps
    assert critic_turn(1e-30, 0.0, 1.0) and not critic_turn(0.0, 0.0, 1.0)


def test_ratio_against_hand_values_sign_blindness_and_zero_guard():
    assert change_ratios((1.5, -1.5), (1.0, -1.0)) == pytest.approx((0.5, 0.5))   # eq. (4) ignores the sign
    assert change_ratios((0.5, 0.0), (-1.0, 0.0)) == pytest.approx((1.5, 0.0))
    r_g, r_d = change_ratios((0.25, 0.0), (0.0, 0.0))                             # L_prev = 0: guarded by ε
    assert math.isfinite(r_g) and r_g == pytest.approx(0.25 / aw.RATIO_EPS) and r_d == 0.0


def stale_dirac_run(steps: int, h: float = 0.05) -> int:
    """The bug the rule invites: only the stepped network's loss is refreshed. Returns u_d."""
    theta, psi = 1.5, 0.5
    r_g = r_d = 1.0
    loss_g, loss_d, previous, u_d = psi * theta, psi * (1 - theta), None, 0
    for _ in range(steps):
        critic = critic_turn(r_d, r_g, 1.0)
        theta, psi = dirac_step(theta, psi, critic, h)
        if critic:
            loss_d, u_d = psi * (1 - theta), u_d + 1
        else:
            loss_g = psi * theta
        r_g, r_d = change_ratios((loss_g, loss_d), previous)
        previous = (loss_g, loss_d)
    return u_d


def test_both_losses_refresh_every_iteration():
    # A rule that refreshed only the stepped network would see r_d = 0 forever and step G forever.
    assert stale_dirac_run(500) == 0
    traj = run_dirac("adaptive", 500, h=0.05, lam=1.0)
    assert traj["critic_turns"][:3] == [False, False, True]  # G, G by the guards, then r_d = 0.0476 > r_g = 0.0164
    assert 100 < traj["u_d"] < 300


def test_fixed_schedule_and_sequence_stats():
    assert [fixed_critic_turn(i, 5, 1) for i in range(12)] == [True] * 5 + [False] + [True] * 5 + [False]
    assert [fixed_critic_turn(i, 1, 1) for i in range(4)] == [True, False, True, False]
    s = run_dirac("fixed", 12, h=0.05)
    assert (s["u_d"], s["u_g"], s["switches"], s["longest_d_run"], s["longest_g_run"]) == (10, 2, 3, 5, 1)


# ---------------------------------------------------------------- Dirac-GAN


def test_dirac_updates_match_the_gradient_of_the_objective():
    # L(θ, ψ) = ψ·1 − ψ·θ (eq. 8): G descends L in θ, D ascends L in ψ; gradients from autograd, not the code
    h = 0.1
    for theta0, psi0 in [(1.5, 0.5), (0.3, -0.2), (1.0, 0.0), (-2.0, 0.4)]:
        theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
        psi = torch.tensor(psi0, dtype=torch.float64, requires_grad=True)
        g_theta, g_psi = torch.autograd.grad(psi - psi * theta, (theta, psi))
        assert dirac_step(theta0, psi0, False, h) == pytest.approx((theta0 - h * g_theta.item(), psi0))
        expected_psi = float(np.clip(psi0 + h * g_psi.item(), -0.5, 0.5))
        assert dirac_step(theta0, psi0, True, h) == pytest.approx((theta0, expected_psi))


def test_dirac_clipping_holds_psi():
    assert dirac_step(-1.0, 0.45, True, 0.1)[1] == 0.5      # 0.45 + 0.2 clipped
    assert dirac_step(3.0, -0.45, True, 0.1)[1] == -0.5
    for strategy in ("fixed", "adaptive"):
        assert np.abs(run_dirac(strategy, 3000, h=0.1)["psi"]).max() <= 0.5


def test_after_a_dirac_critic_step_the_ratios_tie_and_the_generator_steps_next():
    """θ is unchanged by a critic step, so r_g = |Δψ·θ| / |ψθ| and r_d = |Δψ(1 − θ)| / |ψ(1 − θ)| are both |Δψ/ψ|:
    equal up to rounding. With the tolerance the critic never steps twice in a row for λ ≥ 1; without it (tol = 0)
    rounding hands it runs of several steps."""
    rng = np.random.default_rng(0)
    for theta, psi in rng.uniform([-1, -0.45], [3, 0.45], size=(200, 2)):
        before = (psi * theta, psi * (1 - theta))
        theta1, psi1 = dirac_step(theta, psi, True, 0.05)
        r_g, r_d = change_ratios((psi1 * theta1, psi1 * (1 - theta1)), before, eps=0.0)  # ε would shift a tiny L_prev
        assert r_d == pytest.approx(r_g, rel=1e-9)
    for lam in (1.0, 3.0):
        assert run_dirac("adaptive", 5000, h=0.05, lam=lam)["longest_d_run"] <= 1
    assert run_dirac("adaptive", 5000, h=0.05, lam=1.0, tie_tol=0.0)["longest_d_run"] > 1


@pytest.mark.parametrize("h", [0.01, 0.05])
def test_fixed_five_to_one_does_not_reach_the_equilibrium(h):
    """Bound: with u = θ − 1, v = ψ, the 5:1 schedule is (as h → 0) the flow u' = v/6, v' = −5u/6, which conserves
    H = 5u²/6 + v²/6 while |v| < 0.5. Clipping holds v at ±0.5 only while the flow pushes outwards, i.e. until u crosses
    0, so every clipped stretch ends at (0, ±0.5) with H = 1/24, and H never falls below 1/24. On H ≥ 1/24,
    u² + v² ≥ 6H/5 ≥ 1/20, so the distance to (1, 0) stays ≥ 1/√20 ≈ 0.2236. The discrete map adds O(h); 0.2 leaves room."""
    traj = run_dirac("fixed", int(250 / h), h=h)
    dist = np.hypot(np.array(traj["theta"]) - 1, traj["psi"])
    assert dist.min() > 0.2
    assert dist[len(dist) // 2:].min() < 0.2236 + 0.01   # and the limit cycle really is that close (bound is tight)


# ---------------------------------------------------------------- networks, clipping, penalties


def test_network_shapes():
    G, D = build_models("wgan-clip", 100, 8, 3, 64, 0, 0.01, "cpu")
    assert G(torch.randn(3, 100)).shape == (3, 3, 64, 64) and D(torch.randn(3, 3, 64, 64)).shape == (3,)
    G, D = build_models("wgan-gp", 128, 8, 3, 32, 0, 0.01, "cpu")
    assert G(torch.randn(3, 128)).shape == (3, 3, 32, 32) and D(torch.randn(3, 3, 32, 32)).shape == (3,)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in D.modules())   # no batch norm in the penalised critic


def test_critic_is_clipped_at_construction():
    c = 0.01
    _, D = build_models("wgan-clip", 16, 8, 1, 16, 0, c, "cpu")
    values = torch.cat([p.detach().flatten() for p in D.parameters()])
    assert values.abs().max() <= c
    assert (values.abs() == c).float().mean() > 0.3      # N(0, 0.02) weights and N(1, 0.02) BN scales were clipped
    w = nn.Linear(3, 3)
    nn.init.constant_(w.weight, 2.0)
    clip_weights(w, 0.1)
    assert (w.weight == 0.1).all()


def test_gradient_penalty_equals_independent_computations():
    _, D = build_models("wgan-gp", 8, 4, 3, 8, 0, 0.01, "cpu")
    D = D.double()
    real, fake = torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.randn(5, 3, 8, 8, dtype=torch.float64)
    alpha = torch.rand(5, 1, 1, 1, dtype=torch.float64)
    grads = central_differences(D, alpha * real + (1 - alpha) * fake)
    expected = ((grads.norm(dim=1) - 1) ** 2).mean()
    assert gradient_penalty(D, real, fake, alpha).item() == pytest.approx(expected.item(), rel=1e-6)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(12, 1))   # ∇D = w everywhere: GP = (‖w‖ − 1)²
    gp = gradient_penalty(lin, torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2), torch.rand(4, 1, 1, 1))
    assert gp.item() == pytest.approx(((lin[1].weight.norm() - 1) ** 2).item(), rel=1e-5)


def central_differences(D, x, eps=1e-6):
    """Per-sample input gradients of D by central finite differences (float64)."""
    flat = x.flatten(1)
    grads = torch.zeros_like(flat)
    with torch.no_grad():
        for j in range(flat.shape[1]):
            e = torch.zeros_like(flat)
            e[:, j] = eps
            grads[:, j] = (D((flat + e).view_as(x)) - D((flat - e).view_as(x))) / (2 * eps)
    return grads


def test_r1_losses_equal_an_independent_computation():
    """Mescheder et al.'s trainer: BCE-with-logits on real (target 1) and fake (target 0) plus γ/2·E‖∇_x D(x)‖² on
    the real batch; the generator's non-saturating BCE(D(G(z)), 1). Gradients by finite differences."""
    _, D = build_models("r1", 8, 4, 3, 8, 0, 0.01, "cpu")
    D = D.double()
    real, fake = torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.randn(5, 3, 8, 8, dtype=torch.float64)
    r1 = central_differences(D, real).pow(2).sum(1).mean()
    with torch.no_grad():
        d_real, d_fake = D(real), D(fake)
    bce = F.binary_cross_entropy_with_logits
    expected_d = bce(d_real, torch.ones(5, dtype=torch.float64)) + bce(d_fake, torch.zeros(5, dtype=torch.float64)) + 3.0 * r1
    expected_g = bce(d_fake, torch.ones(5, dtype=torch.float64))
    loss_g, loss_d, penalty = gan_losses(D, real, fake, None, "r1", gp_weight=6.0)
    assert penalty.item() == pytest.approx(r1.item(), rel=1e-6)
    assert loss_d.item() == pytest.approx(expected_d.item(), rel=1e-6)
    assert loss_g.item() == pytest.approx(expected_g.item(), rel=1e-9)
    loss_d.backward()                                        # the penalty is differentiable in D's weights
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in D.parameters())


@pytest.mark.parametrize("loss", ["wgan-clip", "wgan-gp", "r1"])
def test_evaluated_losses_use_the_current_weights_and_leave_no_gradients(loss):
    torch.manual_seed(0)
    G, D = build_models(loss, 8, 4, 1, 8, 0, 0.01, "cpu")
    real, z, alpha = torch.rand(16, 1, 8, 8) * 2 - 1, torch.randn(16, 8), torch.rand(16, 1, 1, 1)
    before = evaluate_losses(G, D, real, z, alpha, loss, 10.0)
    with torch.no_grad():
        fake = G(z)
        scores = D(real), D(fake)
    ld = {"r1": None, "wgan-gp": None, "wgan-clip": (scores[1].mean() - scores[0].mean()).item()}[loss]
    lg = (F.softplus(-scores[1]).mean() if loss == "r1" else -scores[1].mean()).item()
    assert before[0].item() == pytest.approx(lg, rel=1e-5, abs=1e-6)
    if ld is not None:
        assert before[1].item() == pytest.approx(ld, rel=1e-5, abs=1e-6) and before[2].item() == 0.0
    assert all(p.grad is None for p in [*G.parameters(), *D.parameters()])
    with torch.no_grad():                                    # a change of G alone moves L_d too (and L_g)
        for p in G.parameters():
            p.add_(0.05 * torch.randn_like(p))
    after = evaluate_losses(G, D, real, z, alpha, loss, 10.0)
    assert (after[:2] != before[:2]).all()


def loop_steps(loss, compiled, steps=2):
    """`steps` rounds of the loop's three calls (a critic step, a generator step, the no-grad re-evaluation) on fresh
    tiny models with SGD (lr 0.01), the G and D of the steps eager or torch.compile'd as train() makes them. Clipping
    at 0.1, not 0.01: the scores of a critic clipped at 0.01 are ~1e-4, too small to compare."""
    G, D = build_models(loss, 8, 4, 1, 8, 0, 0.1, "cpu")
    fast_G, fast_D = (torch.compile(m) if compiled else m for m in (G, D))
    opt_g, opt_d = (torch.optim.SGD(m.parameters(), lr=0.01) for m in (G, D))
    gen, history = torch.Generator().manual_seed(0), []
    for _ in range(steps):
        real, z = torch.rand(16, 1, 8, 8, generator=gen) * 2 - 1, torch.randn(16, 8, generator=gen)
        alpha = torch.rand(16, 1, 1, 1, generator=gen)
        with torch.no_grad():
            fake = fast_G(z)
        opt_d.zero_grad(set_to_none=True)
        d_losses = gan_losses(fast_D, real, fake, alpha, loss, 10.0)
        d_losses[1].backward()
        opt_d.step()
        clip_weights(D, 0.1) if loss == "wgan-clip" else None
        opt_g.zero_grad(set_to_none=True)
        g_loss = aw.generator_loss(fast_D(fast_G(z)), loss)
        g_loss.backward(inputs=list(G.parameters()))
        opt_g.step()
        history.append(torch.cat([d_losses.detach(), g_loss.detach()[None],
                                  evaluate_losses(fast_G, fast_D, real, z, alpha, loss, 10.0)]))
    return torch.stack(history), [p.detach().clone() for p in [*G.parameters(), *D.parameters()]]


@pytest.mark.parametrize("loss", ["wgan-clip", "wgan-gp", "r1"])
def test_compiled_models_match_eager(loss):
    """--compile: G and D compiled, the penalties' input gradients through the uncompiled D (a compiled graph has no
    double backward). Inductor reorders float32 reductions (last-bit differences); with SGD a weight moves by
    −lr·gradient, so weights to 1e-6 after two rounds compare the gradients themselves to 1e-4."""
    eager_losses, eager_params = loop_steps(loss, compiled=False)
    torch._dynamo.reset()
    compiled_losses, compiled_params = loop_steps(loss, compiled=True)
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-4, atol=1e-7)
    for x, y in zip(compiled_params, eager_params):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_medium_precision_training_stays_close():
    """--matmul-precision medium (bf16-backed float32 matmuls where the CPU has them, 8 significant bits; elsewhere
    the same as highest): two rounds of the loop agree with full float32 to 2%."""
    skip_unless_medium_reduces_matmuls()
    highest, _ = loop_steps("wgan-gp", compiled=False)
    try:
        torch.set_float32_matmul_precision("medium")
        medium, _ = loop_steps("wgan-gp", compiled=False)
    finally:
        torch.set_float32_matmul_precision("highest")
    skip_if_medium_changed_nothing(highest, medium)
    torch.testing.assert_close(medium, highest, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- presets and configurations


def test_the_card_command_is_table_2s_wgan_with_lambda_3():
    args = parse_args(["--lam", "3", "--dataset", "cifar10"])
    assert args == dataclasses.replace(PRESETS["default"], lams=[3.0])
    assert (args.losses, args.image_size, args.z_dim, args.lr, args.epochs, args.n_critic) == (
        ["wgan-clip"], 64, 100, 5e-5, 500, 5)
    assert configurations(args) == [aw.Config("wgan-clip_adaptive_lam3", "wgan-clip", "adaptive", 3.0, None, 5e-5, 5e-5)]


def test_table4_is_one_command_with_the_papers_schedules_and_learning_rates():
    rows = {c.name: c for c in configurations(PRESETS["table4"])}
    assert list(rows) == ["wgan-gp_fixed_5-1", "wgan-gp_ttur", "wgan-gp_adaptive_lam1",
                          "r1_fixed_1-1", "r1_ttur", "r1_adaptive_lam1"]
    for loss in ("wgan-gp", "r1"):
        assert rows[f"{loss}_fixed_{5 if loss == 'wgan-gp' else 1}-1"][5:] == (1e-4, 1e-4)   # fixed rows keep 1e-4
        assert rows[f"{loss}_ttur"][4:] == (1, 1e-4, 3e-4)                                 # TTUR: 1:1, lr_g, lr_d
        assert rows[f"{loss}_adaptive_lam1"][5:] == (3e-4, 3e-4)                           # adaptive: 3e-4 both
    args = PRESETS["table4"]
    assert (args.image_size, args.z_dim, args.width, args.epochs, args.gp_weight) == (32, 128, 128, 1000, 10.0)
    assert configurations(parse_args(["--preset", "table4", "--ttur-lr-d", "5e-4"]))[1].lr_d == 5e-4


def test_every_preset_parses_and_cpu_mini_is_small():
    for name, preset in PRESETS.items():
        assert parse_args(["--preset", name]) == preset and preset.preset == name
        validate(preset)
    mini = PRESETS["cpu-mini"]
    iterations = mini.epochs * math.ceil(mini.num_train / mini.batch_size) * len(configurations(mini))
    assert iterations <= 6000 and mini.fid_extractor == "digits" and mini.fid_samples <= 2000


def test_dirac_always_runs_the_fixed_reference():
    names = [c.name for c in configurations(parse_args(["--dataset", "dirac", "--lam", "1", "3"]))]
    assert names == ["fixed_5-1", "adaptive_lam1", "adaptive_lam3"]


@pytest.mark.parametrize("argv,text", [
    (["--lam", "0"], "--loss, --strategy and --lam"), (["--image-size", "48"], "--image-size 48"),
    (["--loss", "wgan-gp", "--image-size", "20"], "--image-size 20"), (["--fid-extractor", "digits"], "digits covers"),
    (["--dataset", "dirac", "--strategy", "ttur"], "drop ttur"), (["--lr", "-1"], "--lr must be positive"),
    (["--gp-weight", "inf"], "--gp-weight is inf"), (["--lam", "1", "nan"], "--lams is [1.0, nan]"),
    (["--batch-size", "0"], "--batch-size must be positive")])
def test_bad_arguments_fail_with_one_line(argv, text):
    with pytest.raises(SystemExit, match=text.replace("[", r"\[").replace("]", r"\]")):
        validate(parse_args(argv))


# ---------------------------------------------------------------- the table from results.json


def fake_result(loss, strategy, lam, history, status="finished"):
    n_d = {"fixed": 5, "ttur": 1}.get(strategy)
    return {"args": dataclasses.asdict(PRESETS["table4"]), "status": status, "reason": "", "loss": loss,
            "strategy": strategy, "lam": lam, "n_d": n_d, "lr_g": 1e-4, "lr_d": 3e-4 if strategy == "ttur" else 1e-4,
            "budget_iterations": 782, "iterations_per_epoch": 782, "u_g": 100, "u_d": 682,
            "history": [{"epoch": e, "iteration": 782 * e, "u_g": 10 * e, "u_d": 20 * e,
                         "metrics": {"fid": f, "is_mean": i, "kid_mean": 0.01, "extractor": "inception-v3-compat",
                                     "num_real": 10, "num_fake": 10}} for e, (f, i) in enumerate(history, 1)]}


def test_summarize_gives_the_papers_columns_from_the_metrics_dicts_in_any_order():
    results = [fake_result("r1", "adaptive", 1.0, [(120.0, 4.1), (45.0, 5.79), (60.0, 5.5)]),
               fake_result("wgan-gp", "fixed", None, [(90.0, 6.0), (34.83, 8.09)]),
               fake_result("wgan-gp", "ttur", None, [(150.0, 7.0), (99.0, 8.41)], status="interrupted")]
    table = summarize(results)
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| Model | Parameters | FID ≤ 100 (epoch) | FID ≤ 50 (epoch) | FID ≤ 30 (epoch) | "
                               "best epoch | IS | FID |")
    assert lines[1].startswith("| WGAN-GP | n_d = 5, n_g = 1; lr 0.0001 | 1 | 2 | * | 2 | 8.09 | 34.83 | 0.0100 | 20 | 40 |")
    assert lines[2].startswith("| WGAN-GP TTUR | n_d = 1, n_g = 1; lr 0.0001/0.0003 (G/D) | 2 | * | * | 2 | 8.41 | 99.00 |")
    assert lines[2].endswith("| interrupted |")
    assert lines[3].startswith("| adaptive Gradient Penalty | λ = 1; lr 0.0001 | 2 | 2 | * | 2 | 5.79 | 45.00 |")
    assert summarize(results[::-1] + results[:1]) == table   # order and a repeated configuration do not matter


# ---------------------------------------------------------------- runs: in-process (fast) and as the user runs them

TINY = ["--dataset", "fake", "--image-size", "8", "--width", "4", "--z-dim", "8", "--batch-size", "32", "--threads", "1"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One data root for the module, so the digit classifier of the fake data is trained once."""
    return tmp_path_factory.mktemp("data")



def run_main(argv, monkeypatch, stop=None):
    """main() in this process, as `python adaptive_wgan.py ARGV` would run it; returns the exit code."""
    monkeypatch.setattr(sys, "argv", ["adaptive_wgan.py", *map(str, argv)])
    monkeypatch.setattr(aw, "signal", SimpleNamespace(signal=lambda *a: None, SIGINT=2, SIGTERM=15))  # pytest's own
    monkeypatch.setattr(aw, "threading", SimpleNamespace(Event=(lambda: stop) if stop else threading.Event))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exit_info:
            aw.main()
    finally:
        torch.set_num_threads(threads)
    return exit_info.value.code


def checkpoint_state(run_dir, config):
    ckpt = torch.load(run_dir / config / "checkpoint.pt", weights_only=False)
    return ckpt["G"], ckpt["D"], ckpt["counters"][:3]


def assert_same_run(a, b, configs):
    for config in configs:
        (ga, da, ca), (gb, db, cb) = checkpoint_state(a, config), checkpoint_state(b, config)
        assert ca == cb and all(torch.equal(ga[k], gb[k]) for k in ga) and all(torch.equal(da[k], db[k]) for k in da)
        ra, rb = (json.loads((d / config / "results.json").read_text()) for d in (a, b))
        assert ra["status"] == rb["status"] == "finished" and ra["history"] == rb["history"]
    assert (a / "results.md").read_text() == (b / "results.md").read_text()


def test_resume_from_a_ctrl_c_checkpoint_continues_exactly(tmp_path, data_root, monkeypatch):
    common = [*TINY, "--loss", "r1", "--strategy", "fixed", "adaptive", "--epochs", "2", "--save-model",
              "--fid-extractor", "digits", "--fid-samples", "64", "--fid-every", "2", "--data-root", data_root,
              "--output-dir", tmp_path]
    assert run_main([*common, "--run-name", "full"], monkeypatch) == 0
    # Ctrl-C after the fixed configuration (32 iterations) and 21 whole iterations of the adaptive one (mid-epoch:
    # 16 iterations per epoch); the event is also checked once before each configuration
    assert run_main([*common, "--run-name", "cut"], monkeypatch, stop=StopAfter(1 + 32 + 1 + 21)) == 130
    cut = tmp_path / "cut"
    saved = json.loads((cut / "r1_adaptive_lam1" / "results.json").read_text())
    assert saved["status"] == "interrupted" and saved["iterations"] == 21
    assert checkpoint_state(cut, "r1_adaptive_lam1")[2] == (21, saved["u_g"], saved["u_d"])  # written on Ctrl-C
    assert (cut / "results.md").read_text().startswith("**status: interrupted**")
    assert json.loads((cut / "results.json").read_text())["status"] == "interrupted"
    assert run_main(["--resume", cut], monkeypatch) == 0                  # no other flag
    assert_same_run(tmp_path / "full", cut, ["r1_fixed_1-1", "r1_adaptive_lam1"])
    history = json.loads((cut / "r1_adaptive_lam1" / "results.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2] and history[0]["metrics"] is None
    assert history[1]["metrics"]["extractor"] == "digits-cnn(fake)" and history[1]["metrics"]["fid"] > 0


def test_resume_from_an_epoch_end_checkpoint_continues_exactly(tmp_path, data_root, monkeypatch):
    common = [*TINY, "--loss", "r1", "--strategy", "adaptive", "--save-model", "--fid-every", "0",
              "--data-root", data_root, "--output-dir", tmp_path]
    assert run_main([*common, "--epochs", "2", "--run-name", "full"], monkeypatch) == 0
    assert run_main([*common, "--epochs", "1", "--run-name", "cut"], monkeypatch) == 0
    saved = json.loads((tmp_path / "cut" / "args.json").read_text())        # as if killed after epoch 1 of 2
    (tmp_path / "cut" / "args.json").write_text(json.dumps({**saved, "epochs": 2}))
    assert run_main(["--resume", tmp_path / "cut"], monkeypatch) == 0
    assert_same_run(tmp_path / "full", tmp_path / "cut", ["r1_adaptive_lam1"])


def test_a_compiled_run_makes_the_eager_runs_decisions(tmp_path, data_root, monkeypatch):
    """--compile through main(): WGAN-GP's fixed and adaptive configurations finish, and the adaptive rule takes
    the same turns as in the eager run (its ratios differ by rounding only, far from the rule's ties here)."""
    common = [*TINY, "--loss", "wgan-gp", "--strategy", "fixed", "adaptive", "--epochs", "1", "--fid-every", "0",
              "--data-root", data_root, "--output-dir", tmp_path]
    assert run_main([*common, "--run-name", "eager"], monkeypatch) == 0
    torch._dynamo.reset()
    compiled_modules, compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda m: compiled_modules.append(m) or compile(m))
    assert run_main([*common, "--run-name", "compiled", "--compile"], monkeypatch) == 0
    assert len(compiled_modules) == 4  # G and D of both configurations
    for config in ("wgan-gp_fixed_5-1", "wgan-gp_adaptive_lam1"):
        eager, compiled = (json.loads((tmp_path / run / config / "results.json").read_text())
                           for run in ("eager", "compiled"))
        assert compiled["status"] == "finished" and compiled["args"]["compile"] and not eager["args"]["compile"]
        assert (compiled["u_g"], compiled["u_d"]) == (eager["u_g"], eager["u_d"]) and compiled["iterations"] == 16
    assert 0 < compiled["u_g"] < 16  # the adaptive rule stepped both networks


def test_a_run_stores_the_metrics_dict_as_is_and_the_table_shows_is(tmp_path, data_root):
    class StubMetrics:  # what common.fid's evaluate_generator returns for the Inception extractor
        def evaluate_generator(self, G, noise, batch_size=None):
            return {"fid": 42.0, "kid_mean": 0.02, "kid_std": 0.001, "is_mean": 3.25, "is_std": 0.1, "precision": 0.5,
                    "recall": 0.4, "extractor": "inception-v3-compat", "num_real": len(noise), "num_fake": len(noise)}
    args = parse_args([*TINY, "--epochs", "2", "--fid-samples", "16", "--data-root", str(data_root)])
    images = aw.load_dataset("fake", image_size=8, root=data_root).x
    (tmp_path / "run").mkdir()
    result = aw.train(args, configurations(args)[0], images, StubMetrics(), tmp_path / "run", torch.device("cpu"),
                      threading.Event(), {"args": dataclasses.asdict(args)})
    assert [h["metrics"]["is_mean"] for h in result["history"]] == [3.25, 3.25]
    assert "| 1 | 3.25 | 42.00 | 0.0200 |" in summarize([result])
    assert json.loads((tmp_path / "run" / "results.json").read_text())["history"] == result["history"]


def test_non_finite_losses_stop_a_configuration_and_all_diverged_exits_3(tmp_path, data_root, monkeypatch):
    argv = [*TINY, "--loss", "wgan-gp", "--strategy", "adaptive", "fixed", "--gp-weight", "1e300", "--epochs", "8", "--fid-every", "0", "--data-root", data_root, "--output-dir", tmp_path, "--run-name", "nan"]
    assert run_main(argv, monkeypatch) == 3
    results = json.loads((tmp_path / "nan" / "results.json").read_text())
    assert results["status"] == "diverged" and results["configs"] == ["wgan-gp_fixed_5-1", "wgan-gp_adaptive_lam1"]
    for config in results["configs"]:
        r = json.loads((tmp_path / "nan" / config / "results.json").read_text())
        assert r["status"] == "diverged" and "non-finite" in r["reason"] and r["iterations"] < 8 * 16
    assert (tmp_path / "nan" / "results.md").read_text().startswith("**status: diverged**")


def test_comparison_runs_one_configuration_per_folder_and_the_table_is_rebuilt_from_disk(tmp_path, data_root,
                                                                                         monkeypatch):
    argv = [*TINY, "--loss", "wgan-clip", "r1", "--strategy", "fixed", "adaptive", "ttur", "--lam", "1", "3",
            "--epochs", "1", "--fid-every", "0", "--save-model", "--data-root", data_root, "--output-dir", tmp_path,
            "--run-name", "cmp"]
    assert run_main(argv, monkeypatch) == 0
    top = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert len(top["configs"]) == 8 and top["status"] == "finished"
    rows = [json.loads((tmp_path / "cmp" / c / "results.json").read_text()) for c in top["configs"]]
    assert all(r["u_g"] + r["u_d"] == 16 for r in rows)                    # equal loop-iteration budgets
    by_name = {r["config"]: r for r in rows}
    assert by_name["wgan-clip_fixed_5-1"]["u_d"] == 14 and by_name["r1_fixed_1-1"]["u_d"] == 8
    assert by_name["wgan-clip_ttur"]["u_d"] == 8
    ttur = torch.load(tmp_path / "cmp" / "r1_ttur" / "checkpoint.pt", weights_only=False)
    assert [ttur[o]["param_groups"][0]["lr"] for o in ("opt_g", "opt_d")] == [5e-5, 1.5e-4]   # the TTUR flags
    table = (tmp_path / "cmp" / "results.md").read_text()
    assert table == summarize(rows[::-1])                                   # the same table from the files
    assert "| adaptive WGAN | λ = 3; lr 5e-05 |" in table and "| Gradient Penalty TTUR |" in table


# ---------------------------------------------------------------- subprocess: as the user runs it


def run(*argv, cwd, check=True, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "GAN_DATA_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, str(REPO / "adaptive_wgan.py"), *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, **kw)
    if check and proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_dirac_first_run_writes_table_figure_and_refuses_to_reuse_the_folder(tmp_path, monkeypatch):
    proc = run("--dataset", "dirac", "--dirac-steps", "2000", "--run-name", "dirac", cwd=tmp_path)
    out = tmp_path / "runs" / "dirac"
    fixed, adaptive = (json.loads((out / c / "results.json").read_text()) for c in ("fixed_5-1", "adaptive_lam1"))
    assert (fixed["u_g"], fixed["u_d"]) == (333, 1667) and fixed["final_distance"] > 0.2
    assert adaptive["longest_d_run"] == 1 and adaptive["u_g"] + adaptive["u_d"] == 2000
    assert (out / "dirac_phase_plane.png").stat().st_size > 10_000
    assert (out / "results.md").read_text() == summarize([fixed, adaptive]) and "final_distance" in proc.stdout
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    message = run_main(["--dataset", "dirac", "--dirac-steps", "100", "--run-name", "dirac",
                        "--output-dir", tmp_path / "runs"], monkeypatch)        # SystemExit("…"): one line, exit 1
    assert message == f"error: {out} already exists: choose another --run-name, or continue it with --resume {out}"
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_learning_rate_fails_in_one_line_and_leaves_no_folder(tmp_path, value):
    proc = run("--lr", value, "--dataset", "fake", "--run-name", "x", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: --lr is {value}: give a finite number"
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_stops_at_a_step_boundary_writes_interrupted_results_and_exits_130(tmp_path):
    argv = [*TINY, "--loss", "wgan-clip", "--epochs", "100000", "--fid-every", "0", "--save-model",
            "--run-name", "sig"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, str(REPO / "adaptive_wgan.py"), *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    config = tmp_path / "runs" / "sig" / "wgan-clip_adaptive_lam1"
    deadline = time.time() + 240
    while not list(config.glob("checkpoint.pt")) and time.time() < deadline:   # an epoch ended: training runs
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert "--resume" in stdout and stdout.strip().count("\n") == 0
    result = json.loads((config / "results.json").read_text())
    assert result["status"] == "interrupted" and 16 <= result["iterations"] < result["budget_iterations"]
    assert torch.load(config / "checkpoint.pt", weights_only=False)["counters"][0] == result["iterations"]
    assert (tmp_path / "runs" / "sig" / "results.md").read_text().startswith("**status: interrupted**")


def test_design_card_command_on_a_cifar10_folder(tmp_path, cifar_root):
    # `--lam 3 --dataset cifar10` on a tiny CIFAR-10-format folder (64×64 DCGAN; FID off: no Inception weights here)
    run("--lam", "3", "--dataset", "cifar10", "--data-root", cifar_root, "--epochs", "2", "--fid-every", "0",
        "--width", "8", "--batch-size", "32", "--save-model", "--run-name", "cifar", cwd=tmp_path)
    out = tmp_path / "runs" / "cifar" / "wgan-clip_adaptive_lam3"
    res = json.loads((out / "results.json").read_text())
    assert res["args"]["dataset"] == "cifar10" and res["iterations"] == 2 * 7 and res["u_g"] + res["u_d"] == 14
    from PIL import Image
    assert Image.open(out / "samples_epoch0002.png").size == (8 * 64 + 9 * 2, 8 * 64 + 9 * 2)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert all(v.abs().max() <= 0.01 for k, v in ckpt["D"].items() if k.endswith(("weight", "bias")))
    assert list(out.glob("events.out.tfevents.*"))


def test_help_shows_concrete_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--n-critic", "5"), ("--lr", "5e-05"), ("--ttur-lr-g", "5e-05"), ("--ttur-lr-d", "0.00015"),
                          ("--adaptive-lr", "0.0"), ("--epochs", "500"), ("--image-size", "64")]:
        assert flag in text and f"(default: {default})" in text
    assert "--strategies" in text and "--lams" in text and "--preset" in text
