"""Tests of sqd_monitor.py: the SQD quantities against hand-worked values, the losses and penalties against
closed forms and finite differences, the turning-point rule, and subprocess runs that check what is written."""
import csv
import json
import math
from fractions import Fraction

import pytest
import torch
import torch.nn as nn

import sqd_monitor as sqd
from common.datasets import ring_data


# ---------------------------------------------------------------- James–Stein entropy

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


# ---------------------------------------------------------------- angle (eq. 4)

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


def test_monitor_stability_quality_diversity():
    net = nn.Linear(4, 3)
    monitor = sqd.SQDMonitor(quality_model=lambda x: torch.full((len(x),), 0.7),
                             mode_model=lambda x: torch.arange(len(x)) % 5, num_modes=5, num_quality=10,
                             num_diversity=20)
    samples = torch.zeros(30, 2)
    first = monitor(samples, G=net.parameters())
    assert math.isnan(first["S_G"])
    before = torch.cat([p.detach().flatten() for p in net.parameters()]).clone()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    after = torch.cat([p.detach().flatten() for p in net.parameters()])
    stats = monitor(samples, G=net.parameters())
    assert stats["S_G"] == pytest.approx(sqd.angle_between(before, after))
    assert stats["Q"] == pytest.approx(0.7)
    assert stats["D"] == pytest.approx(math.log(5))  # 20 samples, 4 per mode
    assert stats["modes"] == 5


# ---------------------------------------------------------------- losses (Table 1)

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


# ---------------------------------------------------------------- penalties (Table 3)

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
    torch.manual_seed(0)
    real, fake = torch.randn(4000, 1, 3, 3), torch.randn(4000, 1, 3, 3)
    x_hat = sqd.penalty_points("gp", real, fake, 0.1)
    alpha = ((x_hat - fake) / (real - fake)).flatten(1)  # one α per sample, shared by its pixels, in [0, 1]
    assert torch.allclose(alpha, alpha[:, :1].expand_as(alpha), atol=1e-3)
    assert alpha.min() >= -1e-4 and alpha.max() <= 1 + 1e-4
    delta = sqd.penalty_points("dragan", real, fake, 0.25) - real  # δ ~ N(0, 0.25 I)
    assert delta.var().item() == pytest.approx(0.25, rel=0.03) and abs(delta.mean().item()) < 0.01


# ---------------------------------------------------------------- ring quality and modes

def test_ring_nearest_mode_and_quality():
    ring = ring_data()
    centres, std = ring.centers, ring.std
    radial = centres / centres.norm(dim=1, keepdim=True)
    points = torch.cat([centres + 2 * std * radial,   # within 3 std: high quality, own mode
                        centres - 5 * std * radial,   # outside 3 std: low quality, still own mode
                        torch.zeros(1, 2) + 1e-3])    # the origin region: low quality
    modes = sqd.nearest_mode(points, centres)
    assert modes[:16].tolist() == list(range(8)) * 2
    quality = sqd.ring_quality(points, centres, std)
    assert quality.tolist() == [1.0] * 8 + [0.0] * 9
    monitor = sqd.SQDMonitor(lambda x: sqd.ring_quality(x, centres, std), lambda x: sqd.nearest_mode(x, centres), 8)
    assert monitor.quality(points[:16]) == pytest.approx(0.5)
    assert monitor.diversity(points[:16]) == (pytest.approx(math.log(8)), 8)
    assert monitor.diversity(centres[[2] * 10])[0] == 0.0


# ---------------------------------------------------------------- turning point rule

def test_turning_point_rule():
    n = 20
    s = [math.nan] + [0.1 * 0.95 ** t for t in range(1, n)]
    q = [0.5 + 0.02 * t for t in range(n)]
    d = [1.0 + 0.05 * t for t in range(n)]
    assert sqd.find_turning_point(s, s, q, d) is None  # smooth run
    s_jump = list(s)
    s_jump[12] = 0.5
    assert sqd.find_turning_point(s_jump, s, q, d) is None  # a jump alone is not a turning point
    q_drop = list(q)
    q_drop[13:] = [0.3] * (n - 13)
    assert sqd.find_turning_point(s_jump, s, q_drop, d) == 12  # jump, then Q falls within the horizon
    assert sqd.find_turning_point(s, s_jump, q, [1.0] * 12 + [0.2] * 8) == 12  # D's jump and a D fall
    assert sqd.find_turning_point(s, s, q_drop, d) is None  # a fall without a jump


def test_networks_and_sizes():
    for size in (28, 32, 64):
        G, D = sqd.Generator(16, 8, 3, size), sqd.Discriminator(8, 3, size, "layer")
        x = G(torch.randn(2, 16))
        assert x.shape == (2, 3, size, size) and D(x).shape == (2,)
    with pytest.raises(SystemExit, match="image size 36"):
        sqd.base_size(36)
    assert sqd.table_window(300, 50) == 50 and sqd.table_window(12, 50) == 2


# ---------------------------------------------------------------- subprocess runs

TINY = ["--dataset", "fake", "--image-size", "16", "--width", "8", "--batch-size", "32", "--num-train", "128",
        "--num-quality", "64", "--num-diversity", "128", "--log-every", "2"]


def test_help(run_script, tmp_path):
    out = run_script("sqd_monitor.py", "--help", cwd=tmp_path).stdout
    assert "--regularizers" in out and "--face-embedding-weights" in out


def test_smoke_all_losses_with_and_without_gp(run_script, tmp_path):
    run_script("sqd_monitor.py", *TINY, "--data-root", tmp_path / "data", "--epochs", "2", "--losses", "nsgan",
               "lsgan", "hinge", "wgan", "--regularizers", "none", "gp", "--run-name", "smoke", cwd=tmp_path)
    out = tmp_path / "runs" / "smoke"
    with open(out / "sqd.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 * 3  # 8 pairs × (initial + 2 epochs)
    assert {(r["loss"], r["regularizer"]) for r in rows} == {(l, g) for l in ("nsgan", "lsgan", "hinge", "wgan")
                                                             for g in ("none", "gp")}
    trained = [r for r in rows if r["epoch"] != "0"]
    assert all(0 < float(r["S_G"]) < math.pi and 0 <= float(r["Q"]) <= 1 for r in trained)
    assert all(0 <= float(r["D"]) <= math.log(10) + 1e-9 for r in rows)
    assert all(float(r["penalty"]) > 0 for r in trained if r["regularizer"] == "gp")
    for pair in ("nsgan-none", "wgan-gp"):
        assert list((out / pair).glob("events.out.tfevents.*"))
        assert (out / pair / "samples" / "epoch_0002.png").exists()
    with open(out / "table2.csv") as f:
        table = list(csv.reader(f))
    assert table[0] == ["loss", "Q none", "Q gp", "D none", "D gp", "turning point none", "turning point gp"]
    assert [r[0] for r in table[1:]] == ["nsgan", "lsgan", "hinge", "wgan"]
    results = json.loads((out / "results.json").read_text())
    assert len(results["pairs"]) == 8 and "digits-cnn(fake)" in results["models"]
    nsgan_none = [r for r in trained if r["loss"] == "nsgan" and r["regularizer"] == "none"]
    assert float(table[1][1]) == pytest.approx(float(nsgan_none[-1]["Q"]), abs=1e-3)  # last sixth of 2 epochs = 1
    assert (out / "sqd_curves.png").exists() and "| nsgan |" in (out / "table2.md").read_text()


def test_ring_training_resume_matches_uninterrupted_run(tmp_path):
    """In-process (no start-up cost): a ring pair trained 3 epochs equals one trained 2, checkpointed, resumed to 3."""
    base = dict(dataset="ring", num_train=512, batch_size=64, width=32, z_dim=4, num_quality=200, num_diversity=400,
                monitor_every=4, output_dir=str(tmp_path), sample_every=10)
    device = torch.device("cpu")
    real, models, _ = sqd.prepare_data_and_models(sqd.Args(**base), device)
    full = sqd.train_pair(sqd.Args(**base, epochs=3), "hinge", "dragan", real, models, tmp_path / "full", device)
    part_dir = tmp_path / "part"
    sqd.train_pair(sqd.Args(**base, epochs=2, save_model=True), "hinge", "dragan", real, models, part_dir, device)
    torch.manual_seed(123)  # the resumed run must restore the RNG itself
    resumed = sqd.train_pair(sqd.Args(**base, epochs=3, save_model=True, resume=str(tmp_path)), "hinge", "dragan",
                             real, models, part_dir, device)
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2, 3]
    for a, b in zip(full["history"], resumed["history"]):
        for key in ("S_G", "S_D", "Q", "D", "modes", "d_loss", "g_loss", "penalty"):
            x, y = a.get(key, 0.0), b.get(key, 0.0)
            assert (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-12), (key, a, b)
    rows = list(csv.DictReader(open(part_dir / "sqd_iterations.csv")))
    assert [int(r["iteration"]) for r in rows] == [4 * k for k in range(1, 7)]  # 8 iterations per epoch
    assert math.isfinite(float(rows[4]["S_G"]))  # the iteration monitor's snapshot survived the resume
    assert full["status"] == "finished" and 0 <= full["D_mean"] <= math.log(8) and (part_dir / "samples" / "epoch_0003.png").exists()


def test_bad_input_fails_with_message():
    with pytest.raises(SystemExit, match="--lam must be"):
        sqd.Args(dataset="fake", lam=-1)
    with pytest.raises(SystemExit, match="image size 36"):
        sqd.Args(dataset="fake", image_size=36)
    with pytest.raises(SystemExit, match="smaller than one batch"):
        sqd.Args(dataset="fake", num_train=10)
    with pytest.raises(SystemExit, match="facenet-pytorch|face-embedding-weights"):
        sqd.face_models("data", None, "cpu", None)


def test_face_models_end_to_end_when_facenet_is_installed(tmp_path):
    """The CelebA path on a tiny fake celeba folder and randomly initialised embedding weights (only the plumbing:
    real weights cannot be fetched here). Skipped where facenet-pytorch is not installed (an optional dependency)."""
    facenet = pytest.importorskip("facenet_pytorch")
    import numpy as np
    from PIL import Image
    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 7):
        Image.fromarray(rng.integers(0, 255, (218, 178, 3), dtype=np.uint8)).save(folder / f"{i:06d}.jpg")
    (tmp_path / "celeba" / "identity_CelebA.txt").write_text("".join(f"{i:06d}.jpg {10 * (1 + i % 3)}\n" for i in range(1, 7)))
    torch.manual_seed(0)
    torch.save(facenet.InceptionResnetV1(pretrained=None).state_dict(), tmp_path / "w.pt")
    quality, modes, num_modes, name = sqd.face_models(str(tmp_path), str(tmp_path / "w.pt"), "cpu", None)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    q, m = quality(x), modes(x)
    assert num_modes == 3 and "MTCNN" in name
    assert q.shape == (3,) and ((q >= 0) & (q <= 1)).all() and m.shape == (3,) and (m < 3).all()


def test_non_finite_loss_stops_the_pair_cleanly(tmp_path):
    args = sqd.Args(dataset="ring", num_train=256, batch_size=64, width=16, z_dim=2, epochs=3, lr=1e30, log_every=1,
                    num_quality=50, num_diversity=50, sample_every=10, output_dir=str(tmp_path))
    device = torch.device("cpu")
    real, models, _ = sqd.prepare_data_and_models(args, device)
    result = sqd.train_pair(args, "wgan", "none", real, models, tmp_path / "wgan-none", device)
    assert result["status"].startswith("diverged: non-finite loss at iteration")
    assert result["epochs"] < 3 and (tmp_path / "wgan-none" / "sqd.csv").exists()
