"""Tests of sqd_monitor.py: the SQD quantities against hand-worked values, S over the weight matrices, the digit
quality model's ranking of real, degraded and non-digit images, the losses and penalties against closed forms and
finite differences, the turning-point rule, Table 2 from results.json, the face path's identity centres, and the
run lifecycle (run folders, bad input, Ctrl-C, SIGKILL, resume, all pairs diverged) checked on what a run writes."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sqd_monitor as sqd
from conftest import REPO, skip_if_medium_changed_nothing, skip_unless_medium_reduces_matmuls, StopAfter


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- James-Stein entropy

def test_james_stein_uniform_gives_log_m():
    for m in (2, 10, 1000):
        counts = torch.full((m,), 7)
        assert sqd.james_stein_entropy(counts) == pytest.approx(math.log(m), rel=1e-12)


def test_james_stein_one_mode_gives_zero():
    counts = torch.zeros(10, dtype=torch.long)
    counts[3] = 2000
    p, lam = sqd.james_stein_probs(counts)
    assert lam == 0.0
    assert sqd.james_stein_entropy(counts) == 0.0
    assert torch.equal(p, torch.nn.functional.one_hot(torch.tensor(3), 10).double())


def test_james_stein_hand_computed_case():
    # counts (4, 1, 0): n = 5, u = (4/5, 1/5, 0), 1 − Σu² = 8/25, Σ(1/3 − u)² = 26/75,
    # λ = (8/25) / (4 · 26/75) = 3/13, p̂ = λ/3 + (1 − λ)u = (9/13, 3/13, 1/13)
    u = [Fraction(4, 5), Fraction(1, 5), Fraction(0)]
    lam = (1 - sum(x * x for x in u)) / (4 * sum((Fraction(1, 3) - x) ** 2 for x in u))
    assert lam == Fraction(3, 13)
    p, lam_code = sqd.james_stein_probs(torch.tensor([4, 1, 0]))
    assert lam_code == pytest.approx(3 / 13, rel=1e-12)
    assert p.tolist() == pytest.approx([9 / 13, 3 / 13, 1 / 13], rel=1e-12)
    expected = -sum(q * math.log(q) for q in (9 / 13, 3 / 13, 1 / 13))
    assert sqd.james_stein_entropy(torch.tensor([4, 1, 0])) == pytest.approx(expected, rel=1e-12)


def test_james_stein_lambda_clipped_to_one():
    # counts (2, 1): 1 − Σu² = 4/9, (n − 1) Σ(1/2 − u)² = 1/9 → λ = 4, clipped to 1 → uniform, ln 2
    p, lam = sqd.james_stein_probs(torch.tensor([2, 1]))
    assert lam == 1.0
    assert p.tolist() == pytest.approx([0.5, 0.5])
    assert sqd.james_stein_entropy(torch.tensor([2, 1])) == pytest.approx(math.log(2))
    # n ≤ 1 and the zero denominator of uniform counts give λ = 1 as well
    assert sqd.james_stein_probs(torch.tensor([1, 0, 0]))[1] == 1.0
    assert sqd.james_stein_probs(torch.tensor([3, 3, 3]))[1] == 1.0


def test_james_stein_between_plugin_and_uniform():
    counts = torch.tensor([50, 30, 10, 5, 5, 0, 0, 0])
    u = counts.double() / counts.sum()
    plugin = -(u[u > 0] * u[u > 0].log()).sum().item()
    js = sqd.james_stein_entropy(counts)
    assert plugin < js <= math.log(8)


# ---------------------------------------------------------------- S (eqs. 4-5) and the monitor

def test_angle_cases_and_scale_invariance():
    g = torch.Generator().manual_seed(0)
    u, w = torch.randn(1000, generator=g, dtype=torch.float64), torch.randn(1000, generator=g, dtype=torch.float64)
    v = w - (w @ u) / (u @ u) * u  # orthogonal to u
    assert sqd.angle_between(u, u) == pytest.approx(0.0, abs=1e-7)
    assert sqd.angle_between(u, -u) == pytest.approx(math.pi, abs=1e-7)
    assert sqd.angle_between(u, v) == pytest.approx(math.pi / 2, abs=1e-6)
    reference = math.acos(float((u.double() @ w.double()) / (u.double().norm() * w.double().norm())))
    assert sqd.angle_between(u, w) == pytest.approx(reference, rel=1e-10)
    assert sqd.angle_between(3.5 * u, 0.01 * w) == pytest.approx(reference, rel=1e-10)


def test_angle_small_rotation_is_resolved():
    e1, e2 = torch.zeros(50, dtype=torch.float64), torch.zeros(50, dtype=torch.float64)
    e1[0], e2[1] = 1, 1
    theta = 1e-6
    assert sqd.angle_between(e1, math.cos(theta) * e1 + math.sin(theta) * e2) == pytest.approx(theta, rel=1e-6)


def test_monitor_stability_quality_diversity_with_one_judge_call_per_call():
    net, calls = nn.Linear(4, 3), []

    def judge(samples, num_quality):  # quality 0.7 for the first num_quality samples, modes 0..4 in turn
        calls.append((len(samples), num_quality))
        return torch.full((num_quality,), 0.7), torch.arange(len(samples)) % 5

    monitor = sqd.SQDMonitor(judge, num_modes=5, num_quality=10, num_diversity=20)
    samples = torch.zeros(30, 2)
    first = monitor(samples, G=sqd.weight_matrices(net))
    assert math.isnan(first["S_G"]) and calls == [(20, 10)]  # one pass over max(num_quality, num_diversity) samples
    before = net.weight.detach().flatten().clone()
    with torch.no_grad():
        net.weight.add_(0.1 * torch.randn_like(net.weight))
    stats = monitor(samples, G=sqd.weight_matrices(net))
    assert stats["S_G"] == pytest.approx(sqd.angle_between(before, net.weight.detach().flatten()))
    assert stats["Q"] == pytest.approx(0.7)
    assert stats["D"] == pytest.approx(math.log(5)) and stats["modes"] == 5  # 20 samples, 4 per mode
    assert len(calls) == 2


def test_monitor_rejects_mode_indices_outside_the_modes():
    for bad in (5, -1):
        monitor = sqd.SQDMonitor(lambda x, n: (torch.ones(n), torch.tensor([0, 1, bad])), num_modes=5, num_quality=3,
                                 num_diversity=3)
        with pytest.raises(ValueError, match=r"mode indices must lie in \[0, 5\)"):
            monitor(torch.zeros(3, 2))


def test_stability_uses_the_weight_matrices_unless_asked_for_all_parameters():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(1, 4), nn.Flatten(), nn.Linear(4, 2))
    weights, every = sqd.weight_matrices(net), sqd.weight_matrices(net, "all")
    assert [w.shape for w in weights] == [(4, 1, 3, 3), (2, 4)]  # conv and linear weights only
    assert len(every) == len(list(net.parameters()))
    monitor = sqd.SQDMonitor(lambda x, n: (torch.ones(n), torch.zeros(len(x), dtype=torch.long)), 1, 1, 1)
    monitor(torch.zeros(1, 1), W=weights, A=every)
    with torch.no_grad():  # scales and biases grow: the weight matrices keep their direction
        net[1].weight.mul_(5), net[2].bias.add_(3), net[4].bias.add_(1)
    stats = monitor(torch.zeros(1, 1), W=weights, A=every)
    assert stats["S_W"] == pytest.approx(0.0, abs=1e-7) and stats["S_A"] > 0.05
    with torch.no_grad():
        net[0].weight.add_(0.5)
    stats = monitor(torch.zeros(1, 1), W=weights, A=every)
    assert stats["S_W"] > 0.05 and stats["S_A"] > 0


# ---------------------------------------------------------------- the turning-point rule

def test_turning_point_needs_a_jump_and_a_drop_that_persists():
    n = 20
    s = [math.nan] + [0.1 * 0.95 ** t for t in range(1, n)]
    q = [0.5 + 0.02 * t for t in range(n)]
    d = [1.0 + 0.05 * t for t in range(n)]
    assert sqd.find_turning_point(s, s, q, d) is None  # smooth run
    s_jump = list(s)
    s_jump[12] = 0.5
    assert sqd.find_turning_point(s_jump, s, q, d) is None  # a jump alone is not a turning point
    q_down = q[:12] + [0.3] * (n - 12)
    assert sqd.find_turning_point(s_jump, s, q_down, d) == 12  # jump, then Q falls and stays down
    assert sqd.find_turning_point(s, s_jump, q, [1.0] * 12 + [0.2] * 8) == 12  # D's jump and D's lasting fall
    assert sqd.find_turning_point(s, s, q_down, d) is None  # a fall without a jump
    q_dip = q[:12] + [0.3, 0.3] + q[14:]  # two bad epochs, then quality is back: not "barely improves" afterwards
    assert sqd.find_turning_point(s_jump, s, q_dip, d) is None
    assert sqd.find_turning_point(s_jump, s, q_down[:15], d[:15]) is None  # too few epochs after it to tell
    assert sqd.find_turning_point(s_jump, s, q_down[:17], d[:17]) == 12  # exactly `persist` epochs after it


def test_turning_point_with_zero_medians():
    n = 20
    s = [math.nan] + [0.1] * (n - 1)
    q_zero, d = [0.0] * n, [2.0] * n
    s_jump = s[:12] + [1.0] + s[13:]
    assert sqd.find_turning_point(s_jump, s, q_zero, d) is None  # Q at 0 all along: nothing falls from 0
    frozen = [math.nan] + [0.0] * (n - 1)  # G did not move for the whole window: any movement is a jump ...
    moved = frozen[:12] + [1e-3] + frozen[13:]
    assert sqd.find_turning_point(moved, frozen, [0.9] * 12 + [0.1] * 8, d) == 12
    assert sqd.find_turning_point(frozen, frozen, [0.9] * 12 + [0.1] * 8, d) is None  # ... but standing still is not


# ---------------------------------------------------------------- losses (Table 1) and penalties (Table 3)

def test_losses_on_hand_made_scores():
    zero, two = torch.zeros(4), torch.full((4,), 2.0)
    assert sqd.discriminator_loss("nsgan", zero, zero).item() == pytest.approx(2 * math.log(2))
    assert sqd.generator_loss("nsgan", zero).item() == pytest.approx(math.log(2))
    real, fake = torch.tensor([2.0]), torch.tensor([-1.0])
    expected = -math.log(1 / (1 + math.exp(-2))) - math.log(1 - 1 / (1 + math.exp(1)))
    assert sqd.discriminator_loss("nsgan", real, fake).item() == pytest.approx(expected, rel=1e-6)
    assert sqd.discriminator_loss("lsgan", torch.ones(3), torch.zeros(3)).item() == 0.0
    assert sqd.discriminator_loss("lsgan", real, fake).item() == pytest.approx(1 + 1)
    assert sqd.generator_loss("lsgan", torch.tensor([3.0])).item() == pytest.approx(4.0)
    assert sqd.generator_loss("lsgan", torch.ones(2)).item() == 0.0
    assert sqd.discriminator_loss("hinge", two, -two).item() == 0.0
    assert sqd.discriminator_loss("hinge", torch.tensor([0.5]), torch.tensor([0.5])).item() == pytest.approx(2.0)
    assert sqd.generator_loss("hinge", torch.tensor([0.5, 1.5])).item() == pytest.approx(-1.0)
    assert sqd.discriminator_loss("wgan", torch.tensor([3.0]), torch.tensor([1.0])).item() == pytest.approx(-2.0)
    assert sqd.generator_loss("wgan", torch.tensor([1.0])).item() == pytest.approx(-1.0)
    # signs: D's loss falls as real scores rise, G's loss falls as fake scores rise (every loss)
    for loss in ("nsgan", "lsgan", "hinge", "wgan"):
        assert sqd.discriminator_loss(loss, torch.tensor([0.9]), zero[:1]) < sqd.discriminator_loss(loss, torch.tensor([0.1]), zero[:1])
        assert sqd.generator_loss(loss, torch.tensor([0.9])) < sqd.generator_loss(loss, torch.tensor([0.1]))


class LinearCritic(nn.Module):
    """D(x) = <w, x> + b: ∇_x D = w everywhere, so every penalty has a closed form in ‖w‖."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        return x.flatten(1) @ self.w + 0.3


@pytest.mark.parametrize("norm", [0.5, 2.0])
def test_penalty_values_and_parameter_gradients(norm):
    w = torch.randn(12, dtype=torch.float64)
    w = w / w.norm() * norm
    points = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    closed = {"gp": (norm - 1) ** 2, "dragan": (norm - 1) ** 2, "zero-gp": norm ** 2, "lipschitz": max(0, norm - 1) ** 2}
    closed_grad = {"gp": 2 * (norm - 1), "dragan": 2 * (norm - 1), "zero-gp": 2 * norm, "lipschitz": 2 * max(0, norm - 1)}
    for reg in closed:
        critic = LinearCritic(w)
        value, norms = sqd.gradient_penalty(reg, critic, points)
        assert value.item() == pytest.approx(closed[reg], rel=1e-10, abs=1e-12)
        assert norms.tolist() == pytest.approx([norm] * 6)
        value.backward()  # d/dw f(‖w‖) = f'(‖w‖) w / ‖w‖
        assert torch.allclose(critic.w.grad, closed_grad[reg] * w / norm, atol=1e-10)
    # GP and Lipschitz agree above norm 1 and differ below it, where Lipschitz is zero; 0-GP differs from both
    if norm < 1:
        assert sqd.gradient_penalty("lipschitz", LinearCritic(w), points)[0].item() == 0.0
        assert sqd.gradient_penalty("gp", LinearCritic(w), points)[0].item() > 0


class QuadraticCritic(nn.Module):
    """D(x) = Σ c_i x_i²: ∇_x D = 2 c ⊙ x depends on the point, so the penalty is a per-sample mean."""

    def __init__(self, c):
        super().__init__()
        self.c = nn.Parameter(c)

    def forward(self, x):
        return (self.c * x.flatten(1) ** 2).sum(1)


@pytest.mark.parametrize("reg", ["gp", "dragan", "zero-gp", "lipschitz"])
def test_penalty_per_sample_and_finite_differences(reg):
    g = torch.Generator().manual_seed(1)
    points = torch.randn(5, 6, generator=g, dtype=torch.float64)
    c = 0.4 * torch.rand(6, generator=g, dtype=torch.float64)
    norms = (2 * c * points).norm(dim=1)
    f = {"gp": lambda n: (n - 1) ** 2, "dragan": lambda n: (n - 1) ** 2, "zero-gp": lambda n: n ** 2,
         "lipschitz": lambda n: torch.clamp(n - 1, min=0) ** 2}[reg]
    value, _ = sqd.gradient_penalty(reg, QuadraticCritic(c.clone()), points)
    assert value.item() == pytest.approx(f(norms).mean().item(), rel=1e-10)
    # gradient w.r.t. D's parameters (a double backward) against finite differences
    critic = lambda cc: (lambda x: (cc * x.flatten(1) ** 2).sum(1))  # noqa: E731  (c kept in the graph)
    assert torch.autograd.gradcheck(lambda cc: sqd.gradient_penalty(reg, critic(cc), points)[0],
                                    (c.clone().requires_grad_(True),))


def test_penalty_points():
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(4000, 1, 3, 3, generator=gen), torch.randn(4000, 1, 3, 3, generator=gen)
    x_hat = sqd.penalty_points("gp", real, fake, 0.1, gen)
    alpha = ((x_hat - fake) / (real - fake)).flatten(1)  # one α per sample, shared by its pixels, in [0, 1]
    assert torch.allclose(alpha, alpha[:, :1].expand_as(alpha), atol=1e-3)
    assert alpha.min() >= -1e-4 and alpha.max() <= 1 + 1e-4
    delta = sqd.penalty_points("dragan", real, fake, 0.25, gen) - real  # δ ~ N(0, 0.25 I)
    assert delta.var().item() == pytest.approx(0.25, rel=0.03) and abs(delta.mean().item()) < 0.01
    # the draws come from the generator passed in: the same state gives the same points
    assert torch.equal(sqd.penalty_points("gp", real, fake, 0.1, torch.Generator().manual_seed(5)),
                       sqd.penalty_points("gp", real, fake, 0.1, torch.Generator().manual_seed(5)))


def test_networks_and_sizes():
    for size in (28, 32, 64):
        args = sqd.Args(dataset="fake", image_size=size, width=8, z_dim=16)
        G, D = sqd.build_models(args, 3, "cpu")
        x = G(torch.randn(2, 16))
        assert x.shape == (2, 3, size, size) and D(x).shape == (2,)
    assert sqd.table_window(300) == 50 and sqd.table_window(12) == 2


def loop_steps(loss, reg, d_norm, compiled, steps=2):
    """`steps` D and G steps of the training loop (SGD, lr 0.01) on fresh tiny models, G and D eager or
    torch.compile'd as train() makes them (the regulariser always through the uncompiled D, as there)."""
    G, D = sqd.build_models(sqd.Args(dataset="fake", image_size=16, width=4, z_dim=8, d_norm=d_norm), 1, "cpu")
    fast_G, fast_D = (torch.compile(m) if compiled else m for m in (G, D))
    g_opt, d_opt = (torch.optim.SGD(m.parameters(), lr=0.01) for m in (G, D))
    gen, history = torch.Generator().manual_seed(0), []
    for _ in range(steps):
        real = torch.rand(16, 1, 16, 16, generator=gen) * 2 - 1
        fake = fast_G(torch.randn(16, 8, generator=gen))
        d_loss = sqd.discriminator_loss(loss, fast_D(real), fast_D(fake.detach()))
        penalty, norms = sqd.gradient_penalty(reg, D, sqd.penalty_points(reg, real, fake.detach(), 0.1, gen)) \
            if reg != "none" else (torch.zeros(()),) * 2
        d_opt.zero_grad(set_to_none=True)
        (d_loss + 10.0 * penalty).backward()
        d_opt.step()
        g_loss = sqd.generator_loss(loss, fast_D(fake))
        g_opt.zero_grad(set_to_none=True)
        g_loss.backward(inputs=list(G.parameters()))
        g_opt.step()
        history.append(torch.stack([d_loss, g_loss, penalty, norms.mean()]).detach())
    return torch.stack(history), [p.detach().clone() for p in [*G.parameters(), *D.parameters()]]


@pytest.mark.parametrize("loss,reg,d_norm", [("nsgan", "gp", "layer"), ("wgan", "dragan", "batch"),
                                             ("hinge", "none", "none")])
def test_compiled_models_match_eager(loss, reg, d_norm):
    """--compile: G and D compiled, the regulariser's input gradient through the uncompiled D (a compiled graph has
    no double backward). Inductor reorders float32 reductions (last-bit differences); with SGD a weight moves by
    −lr·gradient, so weights to 1e-6 after two steps compare the gradients themselves to 1e-4."""
    eager_losses, eager_params = loop_steps(loss, reg, d_norm, compiled=False)
    torch._dynamo.reset()
    compiled_losses, compiled_params = loop_steps(loss, reg, d_norm, compiled=True)
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-4, atol=1e-6)
    for x, y in zip(compiled_params, eager_params):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_medium_precision_training_stays_close():
    """--matmul-precision medium (bf16-backed float32 matmuls where the CPU has them, 8 significant bits; elsewhere
    the same as highest): two steps agree with full float32 to 2%. The models are convolutions only, which stay
    full float32 on a CPU, so here this skips unless some matmul of the step took the bf16 path."""
    skip_unless_medium_reduces_matmuls()
    highest, _ = loop_steps("nsgan", "gp", "layer", compiled=False)
    try:
        torch.set_float32_matmul_precision("medium")
        medium, _ = loop_steps("nsgan", "gp", "layer", compiled=False)
    finally:
        torch.set_float32_matmul_precision("highest")
    skip_if_medium_changed_nothing(highest, medium)
    torch.testing.assert_close(medium, highest, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- the digit quality model

@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One data root for the module, so the quality model of the fake digits is trained once."""
    return tmp_path_factory.mktemp("data")


def blur(x, sigma):
    k = torch.arange(-4, 5).float()
    w = torch.exp(-k ** 2 / (2 * sigma ** 2))
    w = (w / w.sum()).view(1, 1, 1, 9)
    x = F.conv2d(F.pad(x, (4, 4, 0, 0), mode="replicate"), w)
    return F.conv2d(F.pad(x, (0, 0, 4, 4), mode="replicate"), w.transpose(2, 3))


def test_quality_ranks_real_over_degraded_over_noise_and_constants(data_root):
    """On synthetic digits (the `fake` set: ten square positions): real held-out images score near the calibrated
    level, degraded ones (never in the reject class) clearly lower, and noise and constants (the reject class's
    kinds) near zero. docs/sqd_monitor.md has the same check on real MNIST."""
    args = sqd.Args(dataset="fake", image_size=28, data_root=str(data_root), num_quality=128, num_diversity=128)
    judge, num_modes, name, real = sqd.digit_models(args, "cpu")
    g = torch.Generator().manual_seed(0)
    sets = {"real": real, "blurred": blur(real, 1.5), "noisy": (real + 0.2 * torch.randn(real.shape, generator=g)).clamp(-1, 1),
            "half-erased": torch.where(torch.arange(28).view(1, 1, 1, 28) >= 14, -1.0, real),
            "uniform noise": torch.rand(real.shape, generator=g) * 2 - 1,
            "constant": (torch.rand(len(real), 1, 1, 1, generator=g) * 2 - 1).expand_as(real).contiguous()}
    with torch.no_grad():
        q = {k: float(judge(x, len(x))[0].mean()) for k, x in sets.items()}
    assert num_modes == 10 and "digits-cnn+reject(fake)" in name
    assert q["real"] >= 0.85
    for degraded in ("blurred", "noisy", "half-erased"):
        assert 0.05 <= q[degraded] <= q["real"] - 0.2, q
    assert q["uniform noise"] <= 0.02 and q["constant"] <= 0.02, q
    assert min(q["blurred"], q["noisy"], q["half-erased"]) >= max(q["uniform noise"], q["constant"]) + 0.05
    modes = judge(real, 0)[1]
    test = sqd.load_dataset("fake", "test", image_size=28, root=data_root)
    assert (modes == test.y[len(test) // 2:]).float().mean() > 0.9  # modes are the classes


def test_quality_model_cache_is_rebuilt_when_it_cannot_be_read(data_root, capsys):
    args = sqd.Args(dataset="fake", image_size=28, data_root=str(data_root))
    sqd.digit_models(args, "cpu")  # trained (or loaded) once for the module
    (path,) = (data_root / "sqd").glob("fake_reject_cnn_*.pt")
    path.write_bytes(b"not a checkpoint")
    sqd.digit_models(args, "cpu")
    assert "could not be read" in capsys.readouterr().out
    assert torch.load(path, weights_only=True)["head.weight"].shape == (11, 128)


def test_non_digits_are_the_four_families():
    x = sqd.non_digits(400, 28, 0)
    assert x.shape == (400, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.equal(x, sqd.non_digits(400, 28, 0))
    flat = x.flatten(1).float()
    assert (flat[200:300].std(1) == 0).all()  # the constants
    assert (flat[:100].std(1) > 50).all()  # uniform noise: std of U(0, 255) ≈ 74


# ---------------------------------------------------------------- the face path (facenet-pytorch, random weights)

def test_face_identity_centres_from_all_images_with_a_keyed_cache(tmp_path, capsys):
    """The plumbing on a tiny fake CelebA folder (real weights cannot be fetched here): centres from train + test,
    m printed, the cache keyed by the embedding weights and rebuilt when it cannot be read."""
    facenet = pytest.importorskip("facenet_pytorch")
    import numpy as np
    from PIL import Image
    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 9):
        Image.fromarray(rng.integers(0, 255, (218, 178, 3), dtype=np.uint8)).save(folder / f"{i:06d}.jpg")
    # identities 10, 11, 12 in the train split (images 1-6); identity 20 only in the test split (images 7, 8)
    (tmp_path / "celeba" / "identity_CelebA.txt").write_text("".join(f"{i:06d}.jpg {10 + i % 3 if i <= 6 else 20}\n"
                                                                      for i in range(1, 9)))
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("".join(f"{i:06d}.jpg {2 if i > 6 else 0}\n"
                                                                          for i in range(1, 9)))
    torch.manual_seed(0)
    torch.save(facenet.InceptionResnetV1(pretrained=None).state_dict(), tmp_path / "w.pt")
    args = sqd.Args(dataset="celeba", data_root=str(tmp_path), face_embedding_weights=str(tmp_path / "w.pt"),
                    num_quality=2, num_diversity=3)
    judge, num_modes, name, real = sqd.face_models(args, "cpu")
    assert num_modes == 4 and "m = 4 from 8 CelebA images" in capsys.readouterr().out and "MTCNN" in name
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        q, modes = judge(x, 2)
    assert q.shape == (2,) and ((q >= 0) & (q <= 1)).all() and modes.shape == (3,) and (modes < 4).all()
    (cache,) = (tmp_path / "sqd").glob("celeba_identity_centres_*.pt")
    cache.write_bytes(b"broken")
    sqd.face_models(args, "cpu")
    assert "could not be read" in capsys.readouterr().out and torch.load(cache, weights_only=True).shape[0] == 4
    torch.manual_seed(1)  # other embedding weights: another cache file, never the old centres
    torch.save(facenet.InceptionResnetV1(pretrained=None).state_dict(), tmp_path / "w2.pt")
    sqd.face_models(sqd.Args(**{**args.__dict__, "face_embedding_weights": str(tmp_path / "w2.pt")}), "cpu")
    assert len(list((tmp_path / "sqd").glob("celeba_identity_centres_*.pt"))) == 2


# ---------------------------------------------------------------- Table 2 from results.json

def fake_pair(loss, reg, q, d, status="finished", epochs=6, turning=None):
    history = [{"epoch": e, "S_G": 0.1, "S_D": 0.1, "Q": q, "D": d} for e in range(epochs + 1)]
    return {"args": {"dataset": "mnist", "epochs": 6}, "models": "test models", "loss": loss, "regularizer": reg,
            "status": status, "epochs": epochs, "Q_mean": q, "D_mean": d, "turning_point_epoch": turning,
            "history": history, "config": f"{loss}-{reg}",
            "reference": {"real data (held out)": {"Q": 0.95, "D": 2.3, "modes": 10},
                          "uniform noise": {"Q": 0.0, "D": 0.4, "modes": 2}}}


def test_table2_from_results_with_a_diverged_pair_and_reference_rows():
    results = [fake_pair("wgan", "gp", 0.8, 2.2), fake_pair("nsgan", "none", 0.5, 1.5, turning=4),
               fake_pair("nsgan", "gp", 0.7, 2.0), fake_pair("wgan", "none", 0.1, 0.2, status="diverged", epochs=1)]
    table = sqd.summarize(results)
    # the epoch count comes from the arguments, never from a pair that stopped early (the diverged one comes first)
    assert table.splitlines()[0].startswith("mnist: mean Q and D over the last 1 of 6 epochs")
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0] == "| loss | Q none | Q gp | D none | D gp | turning point none | turning point gp |"
    assert lines[1] == "| nsgan | 0.500 | 0.700 | 1.500 | 2.000 | 4 | — |"
    assert lines[2] == "| wgan | — | 0.800 | — | 2.200 | — (diverged after 1 epochs) | — |"
    assert "| real data (held out) | 0.950 | 2.300 | 10 |" in table and "| uniform noise | 0.000 | 0.400 | 2 |" in table
    assert sqd.summarize(results[::-1]) == table


# ---------------------------------------------------------------- runs: in-process (fast) and as the user runs them

TINY = ["--dataset", "fake", "--image-size", "16", "--width", "4", "--z-dim", "8", "--batch-size", "32",
        "--num-train", "128", "--num-quality", "32", "--num-diversity", "64", "--threads", "1"]



def run_main(argv, monkeypatch, stop=None):
    """main() in this process, as `python sqd_monitor.py ARGV` would run it; returns the exit code."""
    monkeypatch.setattr(sys, "argv", ["sqd_monitor.py", *map(str, argv)])
    monkeypatch.setattr(sqd, "signal", SimpleNamespace(signal=lambda *a: None, SIGINT=2, SIGTERM=15))  # pytest's own
    monkeypatch.setattr(sqd, "threading", SimpleNamespace(Event=(lambda: stop) if stop else threading.Event))
    threads = torch.get_num_threads()
    try:
        sqd.main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        torch.set_num_threads(threads)
    return code


def assert_same_run(a, b, pairs):
    for pair in pairs:
        ra, rb = (json.loads((d / pair / "results.json").read_text()) for d in (a, b))
        assert ra["status"] == rb["status"] == "finished"
        assert json.dumps(ra["history"]) == json.dumps(rb["history"])  # every S, Q, D and loss, NaN included
        ca, cb = (torch.load(d / pair / "checkpoint.pt", weights_only=False) for d in (a, b))
        assert all(torch.equal(ca["G"][k], cb["G"][k]) for k in ca["G"]) and all(torch.equal(ca["D"][k], cb["D"][k]) for k in ca["D"])
    assert (a / "results.md").read_text() == (b / "results.md").read_text()


def test_pairs_run_in_their_own_folders_and_the_table_is_built_from_them(tmp_path, data_root, monkeypatch):
    argv = [*TINY, "--epochs", "2", "--losses", "nsgan", "wgan", "--regularizers", "none", "gp",
            "--data-root", data_root, "--output-dir", tmp_path, "--run-name", "cmp"]
    assert run_main(argv, monkeypatch) == 0
    out = tmp_path / "cmp"
    top = json.loads((out / "results.json").read_text())
    assert top["status"] == "finished" and top["pairs"] == ["nsgan-none", "nsgan-gp", "wgan-none", "wgan-gp"]
    pairs = [json.loads((out / c / "results.json").read_text()) for c in ("wgan-gp", "nsgan-none", "wgan-none", "nsgan-gp")]
    assert (out / "table.md").read_text() == sqd.summarize(pairs) == (out / "results.md").read_text()
    for r in pairs:
        assert r["status"] == "finished" and [h["epoch"] for h in r["history"]] == [0, 1, 2]
        assert r["script"] == "sqd_monitor.py" and r["device"] == "cpu" and r["args"]["epochs"] == 2
        assert all(0 < h["S_G"] < math.pi and 0 <= h["Q"] <= 1 and 0 <= h["D"] <= math.log(10) + 1e-9 for h in r["history"][1:])
        assert (r["regularizer"] == "gp") == all(h["penalty"] > 0 for h in r["history"][1:])
        assert r["Q_mean"] == r["history"][-1]["Q"]  # the last sixth of 2 epochs is 1 epoch
        assert list((out / r["config"]).glob("events.out.tfevents.*")) and (out / r["config"] / "samples" / "epoch_0002.png").exists()
    assert set(top["reference"]) == {"real data (held out)", "uniform noise"} and top["reference"]["real data (held out)"]["Q"] > 0.8
    assert "| real data (held out) |" in (out / "results.md").read_text() and (out / "sqd_curves.png").exists()


def test_a_compiled_run_follows_the_eager_run(tmp_path, data_root, monkeypatch):
    """--compile through main(): G and D of each pair compiled, GP through the uncompiled D. Every logged loss, penalty,
    gradient norm and S of two epochs (8 Adam steps) agrees with the eager run to 1e-3 (rounding, not a method change)."""
    common = [*TINY, "--epochs", "2", "--losses", "nsgan", "--regularizers", "none", "gp", "--data-root", data_root,
              "--output-dir", tmp_path]
    assert run_main([*common, "--run-name", "eager"], monkeypatch) == 0
    compiled_modules, compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda m: compiled_modules.append(m) or compile(m))
    assert run_main([*common, "--run-name", "compiled", "--compile"], monkeypatch) == 0
    assert len(compiled_modules) == 4  # G and D of both pairs
    for pair in ("nsgan-none", "nsgan-gp"):
        eager, compiled = (json.loads((tmp_path / run / pair / "results.json").read_text()) for run in ("eager", "compiled"))
        assert compiled["status"] == "finished" and compiled["args"]["compile"] and not eager["args"]["compile"]
        for key in ("d_loss", "g_loss", "penalty", "grad_norm", "S_G", "S_D"):
            got, want = ([h[key] for h in r["history"][1:]] for r in (compiled, eager))
            assert got == pytest.approx(want, rel=1e-3, abs=1e-7), key
    assert compiled["history"][-1]["penalty"] > 0


def test_resume_from_a_ctrl_c_checkpoint_continues_exactly(tmp_path, data_root, monkeypatch):
    common = [*TINY, "--epochs", "2", "--losses", "hinge", "--regularizers", "none", "dragan", "--save-model",
              "--data-root", data_root, "--output-dir", tmp_path]
    assert run_main([*common, "--run-name", "full"], monkeypatch) == 0
    # Ctrl-C after the first pair (8 steps) and 5 whole steps of the second (mid-epoch: 4 steps per epoch); the
    # event is also checked once before each pair
    assert run_main([*common, "--run-name", "cut"], monkeypatch, stop=StopAfter(1 + 8 + 1 + 5)) == 130
    cut = tmp_path / "cut"
    saved = json.loads((cut / "hinge-dragan" / "results.json").read_text())
    assert saved["status"] == "interrupted" and saved["steps"] == 5 and saved["epochs"] == 1
    assert torch.load(cut / "hinge-dragan" / "checkpoint.pt", weights_only=False)["counters"][0] == 5  # on Ctrl-C
    assert (cut / "results.md").read_text().startswith("**status: interrupted**")
    assert json.loads((cut / "results.json").read_text())["status"] == "interrupted"
    assert run_main(["--resume", cut], monkeypatch) == 0  # no other flag
    assert_same_run(tmp_path / "full", cut, ["hinge-none", "hinge-dragan"])


def test_resume_from_an_epoch_end_checkpoint_continues_exactly_and_with_fewer_epochs(tmp_path, data_root, monkeypatch):
    common = [*TINY, "--losses", "lsgan", "--regularizers", "gp", "--save-model", "--data-root", data_root,
              "--output-dir", tmp_path]
    assert run_main([*common, "--epochs", "3", "--run-name", "full"], monkeypatch) == 0
    assert run_main([*common, "--epochs", "2", "--run-name", "cut"], monkeypatch) == 0
    shutil.copytree(tmp_path / "cut", tmp_path / "short")
    saved = json.loads((tmp_path / "cut" / "args.json").read_text())  # as if killed after epoch 2 of 3
    (tmp_path / "cut" / "args.json").write_text(json.dumps({**saved, "epochs": 3}))
    assert run_main(["--resume", tmp_path / "cut"], monkeypatch) == 0
    assert_same_run(tmp_path / "full", tmp_path / "cut", ["lsgan-gp"])
    # a checkpoint with more epochs than asked: nothing to train, the results are written again
    assert run_main(["--resume", tmp_path / "short", "--epochs", "1"], monkeypatch) == 0
    result = json.loads((tmp_path / "short" / "lsgan-gp" / "results.json").read_text())
    assert result["status"] == "finished" and result["epochs"] == 2 and result["args"]["epochs"] == 1


def test_every_pair_diverged_exits_3_with_results_table_and_figure(tmp_path, data_root, monkeypatch, capsys):
    argv = [*TINY, "--epochs", "3", "--lr", "1e30", "--losses", "wgan", "lsgan", "--regularizers",
            "none", "--data-root", data_root, "--output-dir", tmp_path, "--run-name", "nan"]
    assert run_main(argv, monkeypatch) == 3
    out = tmp_path / "nan"
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "diverged" and results["pairs"] == ["wgan-none", "lsgan-none"]
    for pair in ("wgan-none", "lsgan-none"):
        r = json.loads((out / pair / "results.json").read_text())
        assert r["status"] == "diverged" and "non-finite" in r["reason"] and r["steps"] < 3 * 4
    assert (out / "results.md").read_text().startswith("**status: diverged**") and (out / "sqd_curves.png").exists()
    assert "every pair diverged" in capsys.readouterr().out


def test_training_converts_uint8_data_per_batch(tmp_path, data_root):
    args = sqd.parse_args([*TINY, "--epochs", "1", "--data-root", str(data_root)])
    data = sqd.load_dataset("fake", "train", image_size=16, root=data_root, num_samples=128).x
    assert data.dtype == torch.uint8
    judge = lambda x, n: (torch.ones(n), torch.zeros(len(x), dtype=torch.long))  # noqa: E731
    ref = {"r": {"Q": 1.0, "D": 0.0, "modes": 1}}
    result = sqd.train(args, "nsgan", "none", data, judge, 1, tmp_path, torch.device("cpu"), threading.Event(),
                       {"args": args.__dict__, "models": "stub", "reference": ref})
    assert result["status"] == "finished" and data.dtype == torch.uint8 and result["history"][1]["Q"] == 1.0


# ---------------------------------------------------------------- as the user runs it

def run(*argv, cwd, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "GAN_DATA_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, str(REPO / "sqd_monitor.py"), *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_learning_rate_fails_in_one_line_and_leaves_no_folder(tmp_path, value):
    proc = run("--lr", value, "--dataset", "fake", "--run-name", "x", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: --lr is {value}: give a finite number"
    assert not (tmp_path / "runs").exists()


def test_a_reused_run_name_is_refused_and_the_first_run_is_untouched(tmp_path, data_root, monkeypatch):
    argv = [*TINY, "--epochs", "1", "--losses", "nsgan", "--regularizers", "none", "--data-root", data_root,
            "--output-dir", tmp_path, "--run-name", "same"]
    assert run_main(argv, monkeypatch) == 0
    out = tmp_path / "same"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert run_main(argv, monkeypatch) == f"error: {out} already exists: choose another --run-name, or continue it with --resume {out}"
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_ctrl_c_writes_interrupted_results_and_exits_130(tmp_path, data_root):
    argv = [*TINY, "--epochs", "100000", "--losses", "nsgan", "--regularizers", "gp", "--save-model",
            "--data-root", data_root, "--run-name", "sig"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "GAN_DATA_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "sqd_monitor.py"), *map(str, argv)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pair = tmp_path / "runs" / "sig" / "nsgan-gp"
    deadline = time.time() + 240
    while not (pair / "checkpoint.pt").exists() and time.time() < deadline:  # an epoch ended: training runs
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert stdout.strip().splitlines()[-1].startswith("interrupted: checkpoint and results so far in")
    assert f"--resume {tmp_path / 'runs' / 'sig'}".replace(str(tmp_path) + "/", "") in stdout
    result = json.loads((pair / "results.json").read_text())
    assert result["status"] == "interrupted" and 4 <= result["steps"] < 100000 * 4
    assert torch.load(pair / "checkpoint.pt", weights_only=False)["counters"][0] == result["steps"]
    assert (tmp_path / "runs" / "sig" / "results.md").read_text().startswith("**status: interrupted**")


def test_help_and_presets():
    for name, preset in sqd.PRESETS.items():
        assert sqd.parse_args(["--preset", name]) == preset
    mini = sqd.PRESETS["cpu-mini"]
    steps = mini.epochs * (mini.num_train // mini.batch_size) * len(mini.losses) * len(mini.regularizers)
    assert mini.image_size == 28 and mini.width <= 16 and steps <= 60_000  # about 25 min of one CPU core
    assert sqd.PRESETS["table2"].dataset == "celeba" and sqd.PRESETS["fig7"].regularizers == ["none", "gp", "dragan",
                                                                                            "zero-gp", "lipschitz"]
