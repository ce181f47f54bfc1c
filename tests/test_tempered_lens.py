"""Tests of tempered_lens.py: the λ schedule, the loss signs, what D trains on (L(X), also inside the penalty),
isolation of the three updates, identical starts and random streams with and without the lens, Stacked MNIST
mode counts on their own sample set, and the run lifecycle (validation, Ctrl-C, SIGKILL, resume, refusal to
overwrite) as subprocesses."""
import copy
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
import torch

import tempered_lens as tl
from common.datasets import to_uint8
from conftest import REPO, skip_if_medium_changed_nothing, skip_unless_medium_reduces_matmuls
from tempered_lens import (PRESETS, Args, Lens, build_models, discriminator_loss, discriminator_step, generator_loss,
                           lens_adversarial_loss, lens_step, lens_weight, make_optimizer, mode_statistics, parse_args,
                           reconstruction_loss, summarize, xavier_init)

GANS = ["nsgan", "lsgan", "wgan-gp"]
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_args(gan, **kw):
    return replace(Args(), gan=gan, dataset="fake", width=4, lens_width=4, lens_blocks=2, batch_size=8, z_dim=8,
                   n_critic=2 if gan == "wgan-gp" else 1, **kw)


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def same(a, b):
    a = a if isinstance(a, list) else snapshot(a)
    b = b if isinstance(b, list) else snapshot(b)
    return all(torch.equal(p, q) for p, q in zip(a, b))


# ---------------------------------------------------------------- schedule (eq. 4), losses, mode statistics

def test_schedule_values_and_monotone():
    k = 1000
    assert lens_weight(0, k) == 1.0
    assert lens_weight(k // 2, k) == pytest.approx(1 - math.sin(math.pi / 4), abs=1e-12)
    assert lens_weight(k, k) == pytest.approx(0.0, abs=1e-12)
    assert lens_weight(k + 1, k) == 0.0 and lens_weight(10 * k, k) == 0.0
    values = [lens_weight(t, k) for t in range(0, 2 * k)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lens_weight(k // 4, k) > lens_weight(k // 2, k) > lens_weight(3 * k // 4, k)  # strictly falling inside
    assert lens_weight(123, k, fixed=1.0) == 1.0 and lens_weight(5 * k, k, fixed=0.3) == 0.3


@pytest.mark.parametrize("gan", GANS)
def test_loss_gradients_match_closed_forms(gan):
    s = torch.tensor([-1.5, 0.2, 2.0], requires_grad=True)
    g, = torch.autograd.grad(lens_adversarial_loss(gan, s), s)
    expected = {"nsgan": torch.sigmoid(s), "lsgan": 2 * s, "wgan-gp": torch.ones(3)}[gan] / 3
    assert torch.allclose(g, expected.detach(), atol=1e-6)
    # D's loss against eqs. (7), (10), (13) written out
    r, f = torch.tensor([0.3, -0.6]), torch.tensor([1.1, -0.2])
    closed = {"nsgan": -torch.log(torch.sigmoid(r)).mean() - torch.log(1 - torch.sigmoid(f)).mean(),
              "lsgan": (f ** 2).mean() + ((r - 1) ** 2).mean(), "wgan-gp": f.mean() - r.mean()}[gan]
    assert discriminator_loss(gan, r, f).item() == pytest.approx(closed.item(), rel=1e-6)
    # the lens's term works against D's loss on real data: opposite gradients in s (s in (0, 1) for lsgan)
    r = torch.tensor([0.3, 0.6], requires_grad=True)
    g_lens, = torch.autograd.grad(lens_adversarial_loss(gan, r), r)
    g_disc, = torch.autograd.grad(discriminator_loss(gan, r, torch.zeros(2)), r)
    assert (g_lens * g_disc < 0).all()
    fake = torch.tensor([0.5], requires_grad=True)
    g_gen, = torch.autograd.grad(generator_loss(gan, fake), fake)
    assert g_gen.item() < 0  # G pushes its score up, towards "real"


def test_reconstruction_loss_mean_and_sum():
    x, y = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    total = ((x - y) ** 2).sum().item()
    assert reconstruction_loss(x, y).item() == pytest.approx(total / x.numel(), rel=1e-6)
    assert reconstruction_loss(x, y, "sum").item() == pytest.approx(total / 2, rel=1e-6)  # per image, batch mean
    assert reconstruction_loss(x, y, "sum").item() == pytest.approx(48 * reconstruction_loss(x, y).item(), rel=1e-6)


def test_mode_statistics():
    assert mode_statistics(torch.arange(1000)) == (1000, pytest.approx(0.0, abs=1e-9))
    modes, kl = mode_statistics(torch.tensor([3, 3, 7, 7]))
    assert modes == 2 and kl == pytest.approx(math.log(500), rel=1e-9)


# ---------------------------------------------------------------- what D trains on: L(X), also in the penalty

@pytest.mark.parametrize("gan", GANS)
def test_d_update_depends_on_the_lens(gan):
    """One D step from the same D, batch and noise: two different lenses give two different Ds, and each equals
    a lens-less D step whose "real" batch is L(X) computed here (a second route to the same update)."""
    args = tiny_args(gan)
    G, D0, _ = build_models(args, 1, seed=0, use_lens=False, device=CPU)
    x, z = torch.rand(8, 1, 32, 32) * 2 - 1, torch.randn(8, 8)
    trained = []
    for lens_seed in (0, 1):
        torch.manual_seed(lens_seed)
        lens = xavier_init(Lens(1, 4, 2))
        D, D_ref = copy.deepcopy(D0), copy.deepcopy(D0)
        discriminator_step(D, G, lens, torch.optim.SGD(D.parameters(), lr=0.1), x, z, gan, 10.0,
                           torch.Generator().manual_seed(0))
        with torch.no_grad():
            lensed = lens(x)
        discriminator_step(D_ref, G, None, torch.optim.SGD(D_ref.parameters(), lr=0.1), lensed, z, gan, 10.0,
                           torch.Generator().manual_seed(0))
        assert not same(D, D0) and same(D, D_ref)
        trained.append(D)
    assert not same(trained[0], trained[1])


def test_penalty_interpolates_between_lensed_real_and_fake():
    """D's inputs in a WGAN-GP step are L(X), G(Z) and x̂ = εL(X) + (1 − ε)G(Z), ε ∈ [0, 1] per sample."""
    args = tiny_args("wgan-gp")
    G, D, lens = build_models(args, 1, seed=0, use_lens=True, device=CPU)
    seen = []
    D.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    x, z = torch.rand(8, 1, 32, 32) * 2 - 1, torch.randn(8, 8)
    discriminator_step(D, G, lens, torch.optim.SGD(D.parameters(), lr=0.1), x, z, "wgan-gp", 10.0,
                       torch.Generator().manual_seed(0))
    real_view, fake, mixed = seen
    with torch.no_grad():
        lensed = lens(x)
    assert torch.allclose(real_view, lensed) and (lensed - x).abs().mean() > 0.05  # the lens is far from identity
    u, d = (lensed - fake).flatten(1), (mixed - fake).flatten(1)
    eps = (d * u).sum(1) / (u * u).sum(1)
    assert torch.allclose(d, eps[:, None] * u, atol=1e-5)
    assert ((eps >= 0) & (eps <= 1)).all()
    assert torch.allclose(eps, torch.rand(8, generator=torch.Generator().manual_seed(0)), atol=1e-5)


# ---------------------------------------------------------------- the lens step, isolation

@pytest.mark.parametrize("gan", GANS)
def test_lens_step_lowers_real_score_of_lensed_data(gan):
    args = tiny_args(gan)
    G, D, lens = build_models(args, 1, seed=0, use_lens=True, device=CPU)
    D.eval() if gan == "nsgan" else None  # fixed BN statistics so scores before/after are comparable
    with torch.no_grad():
        D[-2].bias.fill_(0.5)  # scores in (0, 1): "real" lies above, LSGAN's fake target 0 below
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    start = copy.deepcopy(lens.state_dict())

    def score_after(lam):
        lens.load_state_dict(start)
        lens_step(lens, D, torch.optim.SGD(lens.parameters(), lr=1e-3), x, lam, gan)
        with torch.no_grad():
            return D(lens(x)).mean().item()

    with torch.no_grad():
        before = D(lens(x)).mean().item()
    assert 0 < before < 1
    assert score_after(1.0) < score_after(0.0) - 1e-7  # the adversarial term lowers D's score of L(X)
    with torch.no_grad():  # a lens that is the identity (L_R gradient zero): the score itself falls
        lens.tail.weight.zero_(), lens.tail.bias.zero_()
    start = copy.deepcopy(lens.state_dict())
    with torch.no_grad():
        before = D(lens(x)).mean().item()
    assert score_after(1.0) < before


def test_identity_lens_init():
    """--lens-init identity: L(X) = X exactly at t = 0, and the zeroed tail still gets a gradient."""
    _, _, lens = build_models(replace(tiny_args("nsgan"), lens_init="identity"), 3, seed=0, use_lens=True, device=CPU)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    assert torch.equal(lens(x), x)
    (lens(x) - x.flip(0)).pow(2).mean().backward()
    assert lens.tail.weight.grad.abs().sum() > 0
    _, _, xavier = build_models(tiny_args("nsgan"), 3, seed=0, use_lens=True, device=CPU)
    assert not torch.allclose(xavier(x), x, atol=1e-3)


@pytest.mark.parametrize("gan", GANS)
def test_d_step_never_changes_lens_and_lens_step_never_changes_d(gan):
    G, D, lens = build_models(tiny_args(gan), 1, seed=0, use_lens=True, device=CPU)
    d_opt, lens_opt = torch.optim.Adam(D.parameters(), lr=1e-2), torch.optim.Adam(lens.parameters(), lr=1e-2)
    x, z = torch.rand(8, 1, 32, 32) * 2 - 1, torch.randn(8, 8)
    lens_before, d_before, g_before = snapshot(lens), snapshot(D), snapshot(G)
    discriminator_step(D, G, lens, d_opt, x, z, gan, 10.0, torch.Generator().manual_seed(0))
    assert not same(D, d_before)
    assert same(lens, lens_before) and all(p.grad is None for p in lens.parameters())
    assert same(G, g_before) and all(p.grad is None for p in G.parameters())
    d_before = snapshot(D)
    d_opt.zero_grad(set_to_none=True)
    lens_step(lens, D, lens_opt, x, 1.0, gan)
    assert not same(lens, lens_before)
    assert same(D, d_before) and all(p.grad is None for p in D.parameters())  # D was frozen
    assert all(p.requires_grad for p in D.parameters())  # and is unfrozen again


@pytest.mark.parametrize("gan", GANS)
def test_same_seed_same_initial_g_and_d_with_and_without_lens(gan):
    G1, D1, lens = build_models(tiny_args(gan), 3, seed=5, use_lens=True, device=CPU)
    G2, D2, none = build_models(tiny_args(gan), 3, seed=5, use_lens=False, device=CPU)
    assert lens is not None and none is None
    for a, b in ((G1, G2), (D1, D2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    G3, _, _ = build_models(tiny_args(gan), 3, seed=6, use_lens=False, device=CPU)
    assert not same(G1, G3)


def test_wgan_gp_preset_is_the_papers_setting():
    args = parse_args(["--preset", "cifar10-wgan-gp"])
    assert (args.gan, args.optimizer, args.z_dim, args.width, args.n_critic, args.fid_samples) == \
        ("wgan-gp", "rmsprop", 128, 128, 5, 10_000)
    assert isinstance(make_optimizer(torch.nn.Linear(2, 2), args, CPU), torch.optim.RMSprop)
    adam = make_optimizer(torch.nn.Linear(2, 2), replace(args, optimizer="adam"), CPU)
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["betas"] == (0.5, 0.9)


# ---------------------------------------------------------------- the training function, in process

class StubFID:
    """common.fid's interface with a constant score; records how many samples each call got."""

    def __init__(self):
        self.sizes = []

    @torch.no_grad()
    def generate(self, G, noise):
        return to_uint8(G(noise))

    def evaluate_generator(self, G, noise):
        self.sizes.append(len(noise))
        return {"fid": 1.0, "kid_mean": 0.0, "kid_std": 0.0, "precision": 0.5, "recall": 0.5, "extractor": "stub",
                "num_real": 2, "num_fake": len(noise)}


class StubClassifier:
    def __init__(self):
        self.sizes = []

    def predict(self, x):
        self.sizes.append(len(x))
        return torch.zeros(len(x), dtype=torch.long)


def test_with_and_without_lens_see_the_same_batches_noise_and_penalty_draws(tmp_path, monkeypatch):
    """Two WGAN-GP runs of the training function, with and without the lens: identical real batches, latent
    noise and penalty ε at every D step, while D's real input is L(X) with the lens and X without."""
    calls = {}
    step, penalty = tl.discriminator_step, tl.gradient_penalty

    def recording_step(D, G, lens, d_opt, real, z, gan, gp_weight, eps_gen):
        calls[lens is not None]["real"].append(real.clone()), calls[lens is not None]["z"].append(z.clone())
        calls["current"] = lens is not None
        return step(D, G, lens, d_opt, real, z, gan, gp_weight, eps_gen)

    def recording_penalty(D, real, fake, eps):
        calls[calls["current"]]["eps"].append(eps.clone()), calls[calls["current"]]["d_real"].append(real.clone())
        return penalty(D, real, fake, eps)

    monkeypatch.setattr(tl, "discriminator_step", recording_step)
    monkeypatch.setattr(tl, "gradient_penalty", recording_penalty)
    args = tiny_args("wgan-gp", total_steps=3, eval_every=100, log_every=1, fid_samples=16)
    images = to_uint8(torch.rand(64, 1, 32, 32) * 2 - 1)
    for use_lens in (True, False):
        calls[use_lens] = {"real": [], "z": [], "eps": [], "d_real": []}
        tl.train(args, 1, use_lens, tmp_path, images, StubFID(), None, CPU, threading.Event())
    with_lens, without = calls[True], calls[False]
    assert len(with_lens["real"]) == len(without["real"]) == 6  # 3 iterations × 2 critic steps
    for key in ("real", "z", "eps"):
        assert all(torch.equal(a, b) for a, b in zip(with_lens[key], without[key])), key
    assert len({tuple(e.flatten().tolist()) for e in with_lens["eps"]}) == 6  # fresh ε at every step
    assert all(torch.equal(a, b) for a, b in zip(without["d_real"], without["real"]))
    assert not any(torch.allclose(a, b) for a, b in zip(with_lens["d_real"], with_lens["real"]))


def d_and_lens_steps(gan, compiled, steps=2):
    """`steps` D and lens updates (SGD, lr 0.01) of fresh tiny models, eager or with torch.compile'd G, D and lens."""
    G, D, lens = build_models(tiny_args(gan), 1, seed=0, use_lens=True, device=CPU)
    fast_G, fast_D, fast_lens = (torch.compile(m) if compiled else m for m in (G, D, lens))
    d_opt, lens_opt = (torch.optim.SGD(m.parameters(), lr=0.01) for m in (D, lens))
    gen, history = torch.Generator().manual_seed(0), []
    for _ in range(steps):
        x, z = torch.rand(8, 1, 32, 32, generator=gen) * 2 - 1, torch.randn(8, 8, generator=gen)
        stats = discriminator_step(fast_D, fast_G, fast_lens, d_opt, x, z, gan, 10.0, torch.Generator().manual_seed(1))
        stats.update(lens_step(fast_lens, fast_D, lens_opt, x, 0.5, gan))
        history.append(torch.stack([v.float() for v in stats.values()]))
    return torch.stack(history), snapshot(D) + snapshot(lens)


@pytest.mark.parametrize("gan", ["nsgan", "wgan-gp"])
def test_compiled_modules_match_eager(gan):
    """--compile: G, D and the lens compiled, WGAN-GP's penalty through the uncompiled D. Inductor reorders float32
    reductions (last-bit differences); with SGD a weight moves by −lr·gradient, so weights to 1e-6 after two steps
    compare the gradients themselves to 1e-4."""
    eager_stats, eager_params = d_and_lens_steps(gan, compiled=False)
    torch._dynamo.reset()
    compiled_stats, compiled_params = d_and_lens_steps(gan, compiled=True)
    torch.testing.assert_close(compiled_stats, eager_stats, rtol=1e-4, atol=1e-5)
    for x, y in zip(compiled_params, eager_params):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_medium_precision_training_stays_close():
    """--matmul-precision medium (bf16-backed float32 matmuls where the CPU has them; 8 significant bits): two D and
    lens steps agree with full float32 to 2%."""
    skip_unless_medium_reduces_matmuls()
    highest, _ = d_and_lens_steps("wgan-gp", compiled=False)
    try:
        torch.set_float32_matmul_precision("medium")
        medium, _ = d_and_lens_steps("wgan-gp", compiled=False)
    finally:
        torch.set_float32_matmul_precision("highest")
    skip_if_medium_changed_nothing(highest, medium)
    torch.testing.assert_close(medium, highest, rtol=2e-2, atol=2e-2)


def test_compiled_training_run_finishes(tmp_path):
    args = tiny_args("wgan-gp", total_steps=3, eval_every=3, log_every=1, fid_samples=16, compile=True)
    images = to_uint8(torch.rand(64, 1, 32, 32) * 2 - 1)
    torch._dynamo.reset()
    result = tl.train(args, 1, True, tmp_path, images, StubFID(), None, CPU, threading.Event())
    saved = json.loads((tmp_path / "lens__seed1" / "results.json").read_text())
    assert result["status"] == saved["status"] == "finished" and saved["steps"] == 3 and saved["args"]["compile"]


def test_mode_counts_use_their_own_sample_count(tmp_path):
    fid, classifier = StubFID(), StubClassifier()
    args = tiny_args("nsgan", total_steps=2, eval_every=1, fid_samples=16, mode_samples=300)
    result = tl.train(args, 1, True, tmp_path, to_uint8(torch.rand(64, 3, 32, 32) * 2 - 1), fid, classifier, CPU,
                      threading.Event())
    assert fid.sizes == [16, 16] and classifier.sizes == [300, 300]
    last = result["evals"][-1]
    assert (last["modes"], last["mode_samples"]) == (1, 300) and last["kl"] == pytest.approx(math.log(1000))
    saved = json.loads((tmp_path / "lens__seed1" / "results.json").read_text())
    assert saved["status"] == "finished" and saved["evals"][-1]["fid"]["num_fake"] == 16


def test_non_finite_loss_stops_the_run_as_diverged(tmp_path):
    args = tiny_args("lsgan", total_steps=20, log_every=2, eval_every=100, fid_samples=8)
    real = torch.zeros(32, 1, 32, 32, dtype=torch.uint8)
    monkey_lr = replace(args, lr=1e30)  # explodes within a few steps
    result = tl.train(monkey_lr, 1, True, tmp_path, real, StubFID(), None, CPU, threading.Event())
    assert result["status"] == "diverged" and result["steps"] < 20 and "non-finite" in result["reason"]
    assert result["evals"] == []
    assert json.loads((tmp_path / "lens__seed1" / "results.json").read_text())["status"] == "diverged"


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    (tmp_path / "lens__seed1").mkdir()
    (tmp_path / "lens__seed1" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=r"checkpoint.pt is not a usable checkpoint"):
        tl.train(tiny_args("nsgan", fid_samples=8), 1, True, tmp_path, torch.zeros(32, 1, 32, 32, dtype=torch.uint8),
                 StubFID(), None, CPU, threading.Event())


def test_summarize_means_and_spread():
    def run(lens, seed, fids, status="finished"):
        return {"lens": lens, "seed": seed, "status": status, "steps": 20, "config": f"{lens}{seed}",
                "evals": [{"step": 10 * (i + 1), "fid": {"fid": f, "extractor": "x", "num_real": 4, "num_fake": 4}}
                          for i, f in enumerate(fids)]}
    table = summarize([run(True, 1, [30.0, 10.0]), run(True, 2, [20.0, 30.0]), run(False, 1, [50.0, 40.0]),
                       run(False, 2, [60.0], "diverged")])
    assert "| with | 1 | finished | 20 | 10.00 | 10.00 (20) |" in table
    assert "| with | 2 / 2 | 20.00 ± 10.00 | 15.00 ± 5.00 |" in table  # final 10, 30; best 10, 20
    assert "| without | 1 / 2 | 40.00 ± 0.00 | 40.00 ± 0.00 |" in table
    assert "| without | 2 | diverged | 20 |  | 60.00 (10) |" in table


# ---------------------------------------------------------------- arguments

def test_presets_parse_and_cpu_mini_is_small():
    for name, preset in PRESETS.items():
        assert parse_args(["--preset", name]) == preset
    mini = PRESETS["cpu-mini"]
    assert mini.total_steps <= 5_000 and mini.width <= 32 and mini.lens_width <= 16 and mini.fid_extractor == "digits"
    assert parse_args(["--preset", "cpu-mini", "--lr", "2e-4"]) == replace(mini, lr=2e-4)


def test_default_fid_samples_on_fake_fail_before_any_folder(tmp_path):
    with pytest.raises(SystemExit, match="--fid-samples 4096 exceeds the 512 training images"):
        tl.main(["--dataset", "fake", "--data-root", str(tmp_path / "data"), "--output-dir", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "args.json").write_text(json.dumps({"dataset": "fake"}))
    with pytest.raises(SystemExit, match="has no checkpoint.pt"):
        tl.validate(parse_args(["--resume", str(tmp_path / "old")]))
    with pytest.raises(SystemExit, match="--resume takes a run folder"):
        parse_args(["--resume", str(tmp_path / "missing")])


# ---------------------------------------------------------------- the run lifecycle, as subprocesses

RUN = ["--dataset", "fake", "--gan", "wgan-gp", "--n-critic", "2", "--total-steps", "40", "--batch-size", "8",
       "--width", "4", "--lens-width", "4", "--lens-blocks", "1", "--z-dim", "8", "--fid-extractor", "digits",
       "--fid-samples", "64", "--eval-every", "10", "--log-every", "5", "--num-seeds", "1", "--save-model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run with and without the lens: the numbers every interrupted-and-resumed run must hit."""
    cwd = tmp_path_factory.mktemp("tempered_lens")
    proc = start(cwd, "ref")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    return cwd


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def start(cwd, name):
    return subprocess.Popen([sys.executable, str(REPO / "tempered_lens.py"), *RUN, "--data-root", str(cwd / "data"),
                             "--run-name", name], cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(folder, pattern, proc, timeout=120):
    end = time.time() + timeout
    while not list(folder.glob(pattern)):
        assert proc.poll() is None, f"the run ended before {pattern} appeared: {proc.stderr.read()}"
        assert time.time() < end
        time.sleep(0.02)


def resume_matches_reference(cwd, name):
    proc = subprocess.run([sys.executable, str(REPO / "tempered_lens.py"), "--resume", f"runs/{name}"], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((cwd / "runs" / name / "results.json").read_text())["status"] == "finished"
    for config in ("lens__seed1", "no-lens__seed1"):
        ref, got = (json.loads((cwd / "runs" / n / config / "results.json").read_text()) for n in ("ref", name))
        assert got["steps"] == ref["steps"] == 40 and got["evals"] == ref["evals"]
        a, b = (torch.load(cwd / "runs" / n / config / "checkpoint.pt", weights_only=True)["states"] for n in ("ref", name))
        for net in ("G", "D", "lens") if config.startswith("lens") else ("G", "D"):
            assert all(torch.equal(a[net][k], b[net][k]) for k in a[net]), (config, net)


def test_outputs_of_a_comparison_run(reference):
    run = reference / "runs" / "ref"
    top = json.loads((run / "results.json").read_text())
    assert top["status"] == "finished" and top["script"] == "tempered_lens.py"
    assert [(r["config"], r["steps"]) for r in top["runs"]] == [("lens__seed1", 40), ("no-lens__seed1", 40)]
    for r in top["runs"]:
        assert [e["step"] for e in r["evals"]] == [10, 20, 30, 40]
        assert r["evals"][-1]["fid"]["extractor"] == "digits-cnn(fake)" and r["evals"][-1]["fid"]["num_fake"] == 64
    assert (run / "table.md").read_text() == summarize(top["runs"]) and "| with | 1 / 1 |" in (run / "results.md").read_text()
    from PIL import Image
    assert Image.open(run / "fid_curves.png").width > 300  # FID against iterations, with and without the lens
    assert Image.open(run / "lens__seed1/samples/step_0000040.png").width > \
        1.9 * Image.open(run / "no-lens__seed1/samples/step_0000040.png").width  # G(z) | L(x) tiles
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = set(EventAccumulator(str(run / "lens__seed1")).Reload().Tags()["scalars"])
    assert {"losses/d_loss", "losses/g_loss", "losses/lens_adversarial", "losses/lens_reconstruction",
            "losses/gradient_penalty", "charts/lambda", "charts/SPS", "eval/fid", "eval/kid"} <= tags
    assert "charts/lambda" not in EventAccumulator(str(run / "no-lens__seed1")).Reload().Tags()["scalars"]


def test_reused_run_name_refuses_and_keeps_the_first_run(reference):
    before = {p: p.read_bytes() for p in (reference / "runs" / "ref").rglob("*") if p.is_file()}
    proc = start(reference, "ref")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "already exists" in err and "--resume" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in (reference / "runs" / "ref").rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_lr_fails_in_one_line(value, run_script, tmp_path):
    proc = run_script("tempered_lens.py", "--dataset", "fake", "--lr", value, "--run-name", "x", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and proc.stderr.strip() == f"error: --lr is {value}: give a finite number"
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_stops_cleanly_and_resumes_to_the_same_numbers(reference):
    proc = start(reference, "sigint")
    wait_for(reference / "runs" / "sigint" / "lens__seed1", "events.out.tfevents.*", proc)  # training has begun
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err
    assert out.strip().splitlines()[-1].endswith("--resume runs/sigint")
    run = reference / "runs" / "sigint"
    assert json.loads((run / "results.json").read_text())["status"] == "interrupted"
    assert (run / "results.md").read_text().startswith("**status: interrupted**")
    assert sum(r["steps"] for r in json.loads((run / "results.json").read_text())["runs"]) < 80
    resume_matches_reference(reference, "sigint")


def test_resume_after_a_kill_continues_from_the_evaluation_checkpoint(reference):
    proc = start(reference, "killed")
    wait_for(reference / "runs" / "killed" / "lens__seed1", "checkpoint.pt", proc)
    proc.kill()
    proc.wait()
    assert not (reference / "runs" / "killed" / "results.json").exists()  # killed before it finished
    resume_matches_reference(reference, "killed")


def test_help_shows_concrete_defaults(run_script, tmp_path):
    text = run_script("tempered_lens.py", "--help", cwd=tmp_path, env={"COLUMNS": "200"}).stdout
    for shown in ("--lens-k INT", "(default: 10000)", "(default: 26000)", "{xavier,identity}", "{mean,sum}",
                  "{adam,rmsprop}"):
        assert shown in text
    assert text.count("(default: None)") == 3  # --run-name, --resume, --inception-weights
