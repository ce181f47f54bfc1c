"""Tests of tempered_lens.py: the λ schedule, the sign of the lens's adversarial terms, the isolation of
lens / D / G updates, identical initial G and D with and without the lens, and subprocess smoke runs."""
import json
import math

import pytest
import torch

from tempered_lens import (Args, Lens, build_models, discriminator_loss, discriminator_step, generator_loss,
                           lens_adversarial_loss, lens_step, lens_weight, mode_statistics, reconstruction_loss,
                           train_iteration)

GANS = ["nsgan", "lsgan", "wgan-gp"]


def tiny_args(gan, **kw):
    return Args(gan=gan, dataset="fake", width=4, lens_width=4, lens_blocks=2, batch_size=8, z_dim=8,
                n_critic=2, **kw)


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def same(module, snap):
    return all(torch.equal(p, q) for p, q in zip(module.parameters(), snap))


# ---------------------------------------------------------------- schedule (eq. 4)

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


# ---------------------------------------------------------------- losses against closed forms

@pytest.mark.parametrize("gan", GANS)
def test_loss_gradients_match_closed_forms(gan):
    s = torch.tensor([-1.5, 0.2, 2.0], requires_grad=True)
    g, = torch.autograd.grad(lens_adversarial_loss(gan, s), s)
    expected = {"nsgan": torch.sigmoid(s), "lsgan": 2 * s, "wgan-gp": torch.ones(3)}[gan] / 3
    assert torch.allclose(g, expected.detach(), atol=1e-6)
    # the lens's term is (approximately) minus D's loss on real data: their gradients in s point opposite ways
    # wherever D's real loss is informative (s in (0, 1) for lsgan)
    r = torch.tensor([0.3, 0.6], requires_grad=True)
    g_lens, = torch.autograd.grad(lens_adversarial_loss(gan, r), r)
    g_disc, = torch.autograd.grad(discriminator_loss(gan, r, torch.zeros(2)), r)
    assert (g_lens * g_disc < 0).all()
    fake = torch.tensor([0.5], requires_grad=True)
    g_gen, = torch.autograd.grad(generator_loss(gan, fake), fake)
    assert g_gen.item() < 0  # G pushes its score up, towards "real"


def test_reconstruction_loss_is_mean_square():
    x, y = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    assert reconstruction_loss(x, y).item() == pytest.approx(((x - y) ** 2).sum().item() / x.numel(), rel=1e-6)


def test_mode_statistics():
    assert mode_statistics(torch.arange(1000)) == (1000, pytest.approx(0.0, abs=1e-9))
    modes, kl = mode_statistics(torch.tensor([3, 3, 7, 7]))
    assert modes == 2 and kl == pytest.approx(math.log(500), rel=1e-9)


# ---------------------------------------------------------------- the lens step's sign, per variant

@pytest.mark.parametrize("gan", GANS)
def test_lens_step_lowers_real_score_of_lensed_data(gan):
    args = tiny_args(gan)
    G, D, lens = build_models(args, 1, seed=0, use_lens=True, device=torch.device("cpu"))
    D.eval() if gan == "nsgan" else None  # fixed BN statistics so scores before/after are comparable
    with torch.no_grad():
        D.body[-1].bias.fill_(0.5)  # scores in (0, 1): "real" lies above, LSGAN's fake target 0 below
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    start = lens.state_dict()

    def score_after(lam):
        lens.load_state_dict(start)
        opt = torch.optim.SGD(lens.parameters(), lr=1e-3)
        lens_step(lens, D, opt, x, lam, gan)
        with torch.no_grad():
            return D(lens(x)).mean().item()

    with torch.no_grad():
        before = D(lens(x)).mean().item()
    assert 0 < before < 1
    # the adversarial term (λ = 1) lowers D's score of L(X) relative to reconstruction alone (λ = 0)
    assert score_after(1.0) < score_after(0.0) - 1e-7
    # with λ = 1 and a lens that is already the identity (L_R gradient zero), the score itself falls
    with torch.no_grad():
        lens.tail.weight.zero_(), lens.tail.bias.zero_()
    start = lens.state_dict()
    with torch.no_grad():
        before = D(lens(x)).mean().item()
    assert score_after(1.0) < before


# ---------------------------------------------------------------- isolation

@pytest.mark.parametrize("gan", GANS)
def test_d_step_never_changes_lens_and_lens_step_never_changes_d(gan):
    args = tiny_args(gan)
    G, D, lens = build_models(args, 1, seed=0, use_lens=True, device=torch.device("cpu"))
    d_opt = torch.optim.Adam(D.parameters(), lr=1e-2)
    lens_opt = torch.optim.Adam(lens.parameters(), lr=1e-2)
    x, z = torch.rand(8, 1, 32, 32) * 2 - 1, torch.randn(8, 8)
    lens_before, d_before, g_before = snapshot(lens), snapshot(D), snapshot(G)
    discriminator_step(D, G, lens, d_opt, x, z, gan, 10.0)
    assert not same(D, d_before)  # the step did something
    assert same(lens, lens_before) and all(p.grad is None for p in lens.parameters())
    assert same(G, g_before) and all(p.grad is None for p in G.parameters())
    d_before = snapshot(D)
    d_opt.zero_grad(set_to_none=True)
    lens_step(lens, D, lens_opt, x, 1.0, gan)
    assert not same(lens, lens_before)
    assert same(D, d_before) and all(p.grad is None for p in D.parameters())  # D was frozen
    assert all(p.requires_grad for p in D.parameters())  # D is unfrozen again


@pytest.mark.parametrize("gan", GANS)
def test_generator_update_does_not_depend_on_the_lens(gan):
    """Two full iterations that differ only in the lens's weights (D's learning rate 0, so D stays the same)
    give the same G; the lenses themselves move differently."""
    args = tiny_args(gan)
    data = torch.rand(64, 1, 32, 32) * 2 - 1
    results = []
    for lens_seed in (0, 1):
        G, D, _ = build_models(args, 1, seed=0, use_lens=False, device=torch.device("cpu"))
        torch.manual_seed(lens_seed)
        lens = Lens(1, 4, 2)
        g_opt = torch.optim.Adam(G.parameters(), lr=1e-3)
        d_opt = torch.optim.Adam(D.parameters(), lr=0.0)
        lens_opt = torch.optim.Adam(lens.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        next_real = lambda: data[torch.randint(64, (8,), generator=gen)]  # noqa: E731
        next_noise = lambda: torch.randn(8, 8, generator=gen)  # noqa: E731
        for step in range(2):
            train_iteration(step, G, D, lens, g_opt, d_opt, lens_opt, next_real, next_noise, args)
        results.append((snapshot(G), snapshot(lens)))
    (g0, l0), (g1, l1) = results
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert not all(torch.equal(a, b) for a, b in zip(l0, l1))
    # and the generator's loss has no path to the lens's parameters at all
    G, D, lens = build_models(args, 1, seed=0, use_lens=True, device=torch.device("cpu"))
    loss = generator_loss(gan, D(G(torch.randn(8, 8))))
    assert all(g is None for g in torch.autograd.grad(loss, list(lens.parameters()), allow_unused=True))


@pytest.mark.parametrize("gan", GANS)
def test_same_seed_same_initial_g_and_d_with_and_without_lens(gan):
    args = tiny_args(gan)
    cpu = torch.device("cpu")
    G1, D1, lens = build_models(args, 3, seed=5, use_lens=True, device=cpu)
    G2, D2, none = build_models(args, 3, seed=5, use_lens=False, device=cpu)
    assert lens is not None and none is None
    for a, b in ((G1, G2), (D1, D2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    G3, _, _ = build_models(args, 3, seed=6, use_lens=False, device=cpu)
    assert not all(torch.equal(p, q) for p, q in zip(G1.parameters(), G3.parameters()))


def test_bad_arguments_fail_with_a_message():
    with pytest.raises(SystemExit, match="lens-k"):
        Args(lens_k=0)
    with pytest.raises(SystemExit, match="lr"):
        Args(lr=-1.0)
    with pytest.raises(SystemExit, match="digits"):
        Args(dataset="cifar10", fid_extractor="digits")
    assert Args(gan="wgan-gp").fid_samples == 10_000 and Args(gan="lsgan").fid_samples == 4_096


# ---------------------------------------------------------------- subprocess smoke runs

SMOKE = ["--dataset", "fake", "--total-steps", "4", "--batch-size", "8", "--width", "4", "--lens-width", "4",
         "--lens-blocks", "1", "--z-dim", "8", "--n-critic", "2", "--fid-extractor", "digits", "--fid-samples", "32",
         "--eval-every", "2", "--sample-every", "2", "--log-every", "2", "--num-grid", "16"]


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory):
    """One data root for the smoke runs, so the fake-data digit classifier is trained once."""
    return tmp_path_factory.mktemp("tempered_lens_data")


def check_compare_outputs(out):
    summary = json.loads((out / "results.json").read_text())
    assert {(r["lens"], r["seed"]) for r in summary["runs"]} == {(True, 1), (False, 1)}
    for r in summary["runs"]:
        assert r["steps"] == 4 and not r["diverged"] and math.isfinite(r["final_fid"])
        assert [s for s, _ in r["fid_curve"]] == [2, 4]
    for sub in ("lens__seed1", "no-lens__seed1"):
        run = out / sub
        assert list(run.glob("events.out.tfevents.*"))
        assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step_0000002.png", "step_0000004.png"]
        assert json.loads((run / "results.json").read_text())["final_fid"] == pytest.approx(
            next(r["final_fid"] for r in summary["runs"] if r["lens"] == (sub == "lens__seed1")))
    for name in ("fid_curves.png", "lambda_schedule.png", "comparison.csv", "results.md"):
        assert (out / name).stat().st_size > 0
    # the lensed panel sits next to the generated one: about twice the width of a generated-only grid
    from PIL import Image
    w_lens = Image.open(out / "lens__seed1" / "samples" / "step_0000004.png").width
    w_plain = Image.open(out / "no-lens__seed1" / "samples" / "step_0000004.png").width
    assert w_lens > 1.9 * w_plain
    # TensorBoard scalars: the lens's loss terms and λ only with the lens
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = EventAccumulator(str(out / "lens__seed1")).Reload().Tags()["scalars"]
    assert {"losses/lens_adversarial", "losses/lens_reconstruction", "charts/lambda", "eval/fid",
            "losses/d_loss", "losses/g_loss"} <= set(tags)
    assert "charts/lambda" not in EventAccumulator(str(out / "no-lens__seed1")).Reload().Tags()["scalars"]


@pytest.mark.parametrize("gan", ["nsgan", "lsgan"])
def test_smoke_compare_run_writes_outputs(gan, run_script, tmp_path, shared_data):
    run_script("tempered_lens.py", *SMOKE, "--gan", gan, "--compare", "--run-name", "smoke",
               "--data-root", str(shared_data), cwd=tmp_path, timeout=300)
    check_compare_outputs(tmp_path / "runs" / "smoke")


def test_smoke_wgan_gp_and_resume(run_script, tmp_path, shared_data):
    """wgan-gp with and without the lens for 4 steps; then 2 steps + a resume to 4 give the same weights."""
    common = [*SMOKE, "--gan", "wgan-gp", "--save-model", "--data-root", str(shared_data)]
    run_script("tempered_lens.py", *common, "--compare", "--run-name", "full", cwd=tmp_path, timeout=300)
    check_compare_outputs(tmp_path / "runs" / "full")
    run_script("tempered_lens.py", *common, "--run-name", "half", "--total-steps", "2", cwd=tmp_path, timeout=300)
    ckpt = tmp_path / "runs" / "half" / "lens__seed1" / "checkpoint.pt"
    assert torch.load(ckpt, weights_only=False)["step"] == 2
    run_script("tempered_lens.py", *common, "--resume", str(ckpt), cwd=tmp_path, timeout=300)
    a = torch.load(tmp_path / "runs" / "full" / "lens__seed1" / "checkpoint.pt", weights_only=False)
    b = torch.load(ckpt, weights_only=False)
    assert b["step"] == 4
    for net in ("G", "D", "lens"):
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net])


def test_help_and_bad_dataset(run_script, tmp_path):
    assert "--lens-k" in run_script("tempered_lens.py", "--help", cwd=tmp_path).stdout
    proc = run_script("tempered_lens.py", "--dataset", "mnist", "--data-root", str(tmp_path / "none"),
                      cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "MNIST" in proc.stderr + proc.stdout


def test_non_finite_loss_stops_the_run_as_diverged(tmp_path):
    """Real data with a NaN makes D's loss non-finite: the run stops at the next log, is recorded as diverged
    with the reason, and still writes its results."""
    from tempered_lens import train

    class StubFID:
        name = "stub"

        def __call__(self, images):
            return 1.0

    args = tiny_args("lsgan", total_steps=20, log_every=2, eval_every=100, sample_every=100, fid_samples=8,
                     num_grid=4)
    real = torch.rand(32, 1, 32, 32) * 2 - 1
    real[:] = float("nan")
    result = train(args, 1, True, tmp_path / "run", real, StubFID(), None, torch.device("cpu"))
    assert result["diverged"] and result["steps"] == 2 and "non-finite" in result["reason"]
    assert result["final_fid"] is None
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["diverged"] and "d_loss" in saved["reason"]
