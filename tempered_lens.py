"""Tempered Adversarial Networks: a lens between the real data and the discriminator.

Paper: M. S. M. Sajjadi, G. Parascandolo, A. Mehrjou, B. Schölkopf, "Tempered Adversarial Networks",
ICML 2018, https://arxiv.org/abs/1802.04374

The discriminator never sees the real images X directly: it sees L(X), the output of a residual
fully-convolutional "lens" network. The lens is trained once per generator iteration with
L_L = λ·L_A + L_R (eq. 3): an adversarial term L_A that works against the discriminator (it pushes
lensed real data towards what D calls fake, eqs. 8/11/14) and a reconstruction term L_R = ‖X − L(X)‖²
(eq. 2). λ falls from 1 to 0 over K generator iterations (λ = 1 − sin(tπ/2K), eq. 4), after which the
lens only reconstructs and training becomes the plain GAN again. Early on, the lens moves the target
distribution towards the generator's samples, which keeps G and D balanced. G and D start from the same
weights with and without the lens, so a comparison isolates the lens.

    # DCGAN (non-saturating GAN) on MNIST with the lens, K = 10^4 (the figures' value)
    python tempered_lens.py --dataset mnist --gan nsgan
    # the paper's comparison: 3 seeds with and without the lens, FID curves and table
    python tempered_lens.py --dataset stacked-mnist --gan nsgan --compare --num-seeds 3 --fid-extractor digits
    # WGAN-GP on CIFAR-10 (10k-sample Inception FID, local Inception weights)
    python tempered_lens.py --dataset cifar10 --gan wgan-gp --compare --inception-weights inception-2015-12-05-fid.pth
    # CPU quick run: small networks, short schedule, in-domain FID
    python tempered_lens.py --dataset mnist --total-steps 1000 --lens-k 500 --width 32 --lens-width 16 \
        --compare --num-seeds 2 --fid-extractor digits --fid-samples 2048 --eval-every 250
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from common.datasets import Batches, load_dataset, to_float, to_uint8
from common.fid import FID, load_digit_classifier

IMAGE_SIZE = 32  # every experiment of the paper is at 32×32 (Sec. 2.4); the networks are built for it


@dataclass
class Args:
    # experiment
    exp_name: str = Path(__file__).stem
    """name of the experiment (part of the run name)"""
    seed: int = 1
    """first seed; runs use seed, seed+1, ... (weights, batch order and noise all follow it)"""
    num_seeds: int = 1
    """number of seeds to run (the paper uses at least 3 per configuration)"""
    torch_deterministic: bool = True
    """torch.backends.cudnn.deterministic"""
    cuda: bool = True
    """use CUDA when available"""
    threads: int | None = None
    """torch CPU threads (None: torch's default)"""
    output_dir: str = "runs"
    """folder that receives runs/{run_name}/"""
    run_name: str | None = None
    """override the run name (default {dataset}__{exp_name}__{seed}__{unix time})"""
    save_model: bool = False
    """save a checkpoint (G, D, lens, optimisers, data order) at every evaluation and at the end"""
    resume: str | None = None
    """path to a checkpoint.pt to continue (single run only); outputs go on in its folder"""
    # data
    dataset: Literal["mnist", "stacked-mnist", "cifar10", "celeba", "fake"] = "mnist"
    """training data, always at 32×32 (fake: synthetic images for tests)"""
    data_root: str = "data"
    """root folder of the datasets (and of cached FID statistics / digit classifiers)"""
    num_train_samples: int | None = None
    """keep only the first n training images (None: all)"""
    # method
    gan: Literal["nsgan", "lsgan", "wgan-gp"] = "nsgan"
    """GAN variant: original non-saturating GAN (DCGAN with batch norm, Sec. 2.1), LSGAN (no batch norm,
    Sec. 2.2) or WGAN-GP (Gulrajani's CIFAR model, Sec. 2.3)"""
    lens: bool = True
    """put the lens in front of D (--no-lens: the plain GAN); ignored with --compare"""
    compare: bool = False
    """run every seed both with and without the lens and write the comparison (table, FID curves)"""
    lens_k: int = 10_000
    """K of eq. (4): λ falls from 1 to 0 over K generator iterations (10^4 in Figs. 2 and 7)"""
    fixed_lam: float | None = None
    """hold λ fixed at this value instead of the schedule (Fig. 5 top uses λ = 1)"""
    lens_width: int = 64
    """feature channels of the lens"""
    lens_blocks: int = 8
    """residual blocks of the lens (Fig. 4: 8)"""
    total_steps: int = 100_000
    """generator iterations (the lens is updated once per generator iteration)"""
    batch_size: int = 64
    """batch size (Sec. 2.4: 32 and 64)"""
    lr: float = 1e-4
    """Adam learning rate of G, D and the lens (Sec. 2.4)"""
    beta1: float | None = None
    """Adam β1 (None: 0.5 for every variant, the DCGAN / Gulrajani CIFAR setting)"""
    beta2: float | None = None
    """Adam β2 (None: 0.999 for nsgan/lsgan, 0.9 for wgan-gp as in Gulrajani's CIFAR code)"""
    z_dim: int = 100
    """latent size of G"""
    width: int | None = None
    """C of Fig. 3, channels of the first D layer / last G layer (None: 64 for nsgan/lsgan, 128 for wgan-gp)"""
    n_critic: int = 5
    """critic iterations per generator iteration for wgan-gp (nsgan/lsgan use 1)"""
    gp_weight: float = 10.0
    """gradient-penalty weight for wgan-gp"""
    # evaluation
    fid_extractor: Literal["inception", "digits"] = "inception"
    """features for FID: Inception (standard) or the in-domain digit CNN (mnist / stacked-mnist / fake)"""
    fid_samples: int | None = None
    """samples for FID (None: 4,096 for nsgan/lsgan, 10,000 for wgan-gp, Sec. 2.4)"""
    inception_weights: str | None = None
    """local Inception FID weights (inception-2015-12-05-fid.pth) where there is no network"""
    eval_every: int = 5_000
    """generator iterations between FID evaluations (also run at the end)"""
    sample_every: int = 5_000
    """generator iterations between saved sample grids (generated | lensed)"""
    log_every: int = 100
    """generator iterations between scalar logs and the non-finite loss check"""
    num_grid: int = 64
    """images per side of a sample grid"""

    def __post_init__(self):
        def fail(message):
            raise SystemExit(f"error: {message}")
        for name in ("num_seeds", "lens_k", "lens_width", "lens_blocks", "total_steps", "batch_size", "z_dim",
                     "n_critic", "eval_every", "sample_every", "log_every", "num_grid"):
            if getattr(self, name) <= 0:
                fail(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            fail(f"--lr must be positive, got {self.lr}")
        if self.gp_weight < 0:
            fail(f"--gp-weight must be ≥ 0, got {self.gp_weight}")
        if self.fixed_lam is not None and self.fixed_lam < 0:
            fail(f"--fixed-lam must be ≥ 0, got {self.fixed_lam}")
        if self.fid_extractor == "digits" and self.dataset not in ("mnist", "stacked-mnist", "fake"):
            fail(f"--fid-extractor digits covers mnist, stacked-mnist and fake, not {self.dataset}: use inception")
        if self.resume is not None and (self.compare or self.num_seeds > 1):
            fail("--resume continues one run: drop --compare / --num-seeds")
        if self.resume is not None and not Path(self.resume).is_file():
            fail(f"checkpoint '{self.resume}' does not exist: pass the checkpoint.pt of a run saved with --save-model")
        self.beta1 = 0.5 if self.beta1 is None else self.beta1
        self.beta2 = (0.9 if self.gan == "wgan-gp" else 0.999) if self.beta2 is None else self.beta2
        self.width = (128 if self.gan == "wgan-gp" else 64) if self.width is None else self.width
        self.fid_samples = (10_000 if self.gan == "wgan-gp" else 4_096) if self.fid_samples is None else self.fid_samples
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            fail(f"Adam betas must lie in [0, 1), got {self.beta1}, {self.beta2}")
        if self.width <= 0 or self.fid_samples < 2:
            fail("--width must be positive and --fid-samples at least 2")


# ---------------------------------------------------------------- networks

def xavier_init(module: nn.Module) -> None:
    """Xavier (Glorot) initialisation for every network (Sec. 2.4)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """Fig. 3 (top): z → 4×4×4C → 8×8×2C → 16×16×C → 32×32×channels, ReLU, tanh output.
    kernel 4 (DCGAN) or 5 (Gulrajani's CIFAR model), stride 2 up-sampling."""

    def __init__(self, z_dim: int, width: int, channels: int, batch_norm: bool, kernel: int = 4):
        super().__init__()
        pad, out_pad = (1, 0) if kernel == 4 else (2, 1)
        norm2d = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
        self.width = width
        self.project = nn.Sequential(nn.Linear(z_dim, 4 * 4 * 4 * width),
                                     nn.BatchNorm1d(4 * 4 * 4 * width) if batch_norm else nn.Identity(), nn.ReLU())
        self.body = nn.Sequential(
            nn.ConvTranspose2d(4 * width, 2 * width, kernel, 2, pad, out_pad), norm2d(2 * width), nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, kernel, 2, pad, out_pad), norm2d(width), nn.ReLU(),
            nn.ConvTranspose2d(width, channels, kernel, 2, pad, out_pad), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z).view(len(z), 4 * self.width, 4, 4))


class Discriminator(nn.Module):
    """Fig. 3 (bottom): 32×32 → 16×16×C → 8×8×2C → 4×4×4C → one raw score (no sigmoid: the losses
    apply it). Leaky ReLU 0.2; batch norm (nsgan only) on all but the first layer, as in DCGAN."""

    def __init__(self, width: int, channels: int, batch_norm: bool, kernel: int = 4):
        super().__init__()
        pad = 1 if kernel == 4 else 2
        norm2d = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, kernel, 2, pad), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, kernel, 2, pad), norm2d(2 * width), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, kernel, 2, pad), norm2d(4 * width), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(4 * 4 * 4 * width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(1)


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, 1, 1)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.conv2(F.relu(self.conv1(h)))


class Lens(nn.Module):
    """Fig. 4: 3×3 stride-1 convolutions only, `blocks` residual blocks, and a global skip from input to
    output, L(x) = x + net(x), so that the identity is easy to reach. No normalisation, no output activation."""

    def __init__(self, channels: int, width: int = 64, blocks: int = 8):
        super().__init__()
        self.head = nn.Conv2d(channels, width, 3, 1, 1)
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in range(blocks)])
        self.tail = nn.Conv2d(width, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.tail(F.relu(self.blocks(self.head(x))))


def build_models(args: Args, channels: int, seed: int, use_lens: bool, device) -> tuple[nn.Module, nn.Module, nn.Module | None]:
    """G and D are drawn first from `seed`, the lens afterwards from its own seed: the same seed gives the
    same initial G and D with and without the lens (the paper's protocol, Sec. 4)."""
    batch_norm, kernel = {"nsgan": (True, 4), "lsgan": (False, 4), "wgan-gp": (None, 5)}[args.gan]
    torch.manual_seed(seed)
    G = Generator(args.z_dim, args.width, channels, batch_norm is not False, kernel)  # WGAN-GP: BN in G only
    D = Discriminator(args.width, channels, batch_norm is True, kernel)
    xavier_init(G)
    xavier_init(D)
    lens = None
    if use_lens:
        torch.manual_seed(seed + 1_000_003)
        lens = Lens(channels, args.lens_width, args.lens_blocks)
        xavier_init(lens)
    return G.to(device), D.to(device), None if lens is None else lens.to(device)


# ---------------------------------------------------------------- losses (D returns raw scores s; D(x) = σ(s) for nsgan)

def discriminator_loss(gan: str, real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """D's loss with the lensed real data L(X) as "real"."""
    if gan == "nsgan":  # eq. (7): −log D(L(X)) − log(1 − D(G(Z)))
        return F.softplus(-real_scores).mean() + F.softplus(fake_scores).mean()
    if gan == "lsgan":  # eq. (10): D(G(Z))² + (D(L(X)) − 1)²
        return fake_scores.pow(2).mean() + (real_scores - 1).pow(2).mean()
    return fake_scores.mean() - real_scores.mean()  # eq. (13)


def generator_loss(gan: str, fake_scores: torch.Tensor) -> torch.Tensor:
    """G's loss: unchanged by the lens."""
    if gan == "nsgan":  # eq. (5): −log D(G(Z))
        return F.softplus(-fake_scores).mean()
    if gan == "lsgan":  # eq. (9): (D(G(Z)) − 1)²
        return (fake_scores - 1).pow(2).mean()
    return -fake_scores.mean()  # eq. (12)


def lens_adversarial_loss(gan: str, lensed_scores: torch.Tensor) -> torch.Tensor:
    """L_A: the lens pushes D's score of lensed real data towards "fake"."""
    if gan == "nsgan":  # eq. (8): −log(1 − D(L(X))) = softplus(s)
        return F.softplus(lensed_scores).mean()
    if gan == "lsgan":  # eq. (11): D(L(X))², towards LSGAN's fake target 0
        return lensed_scores.pow(2).mean()
    return lensed_scores.mean()  # eq. (14)


def reconstruction_loss(real: torch.Tensor, lensed: torch.Tensor) -> torch.Tensor:
    """L_R = ‖X − L(X)‖², eq. (2), as a mean over elements (so its scale does not depend on image size)."""
    return (real - lensed).pow(2).mean()


def lens_weight(step: int, k: int, fixed: float | None = None) -> float:
    """λ of eq. (4): 1 − sin(tπ/2K) for t ≤ K, 0 after; `fixed` overrides the schedule. t counts generator
    iterations from 0."""
    if fixed is not None:
        return fixed
    return 1.0 - math.sin(step * math.pi / (2 * k)) if step <= k else 0.0


def gradient_penalty(D: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP: (‖∇D(x̂)‖ − 1)² at x̂ = εr + (1 − ε)f; with a lens, r = L(X) (what D calls real)."""
    eps = torch.rand(len(real), 1, 1, 1, device=real.device)
    mixed = (eps * real + (1 - eps) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(D(mixed).sum(), mixed, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


# ---------------------------------------------------------------- one training iteration

def discriminator_step(D, G, lens, d_opt, real, z, gan: str, gp_weight: float) -> dict:
    """One D update on (L(X), G(Z)). L(X) and G(Z) are computed without gradients: this step never
    changes the lens or G."""
    with torch.no_grad():
        real_view = real if lens is None else lens(real)  # D sees L(X) in place of X
        fake = G(z)
    real_scores, fake_scores = D(real_view), D(fake)
    loss = discriminator_loss(gan, real_scores, fake_scores)
    penalty = torch.zeros((), device=real.device)
    if gan == "wgan-gp":
        penalty = gradient_penalty(D, real_view, fake)  # interpolates between L(X) and G(Z)
        loss = loss + gp_weight * penalty
    d_opt.zero_grad(set_to_none=True)
    loss.backward()
    d_opt.step()
    return {"d_loss": loss.detach(), "gradient_penalty": penalty.detach(),
            "d_real_score": real_scores.detach().mean(), "d_fake_score": fake_scores.detach().mean()}


def generator_step(G, D, g_opt, z, gan: str) -> dict:
    """One G update; D's parameters are frozen so they get no gradient."""
    requires_grad(D, False)
    loss = generator_loss(gan, D(G(z)))
    g_opt.zero_grad(set_to_none=True)
    loss.backward()
    g_opt.step()
    requires_grad(D, True)
    return {"g_loss": loss.detach()}


def lens_step(lens, D, lens_opt, real, lam: float, gan: str) -> dict:
    """One lens update with L_L = λ·L_A + L_R (eq. 3); D is frozen, so this step never changes D."""
    requires_grad(D, False)
    lensed = lens(real)
    adversarial = lens_adversarial_loss(gan, D(lensed))
    reconstruction = reconstruction_loss(real, lensed)
    loss = lam * adversarial + reconstruction
    lens_opt.zero_grad(set_to_none=True)
    loss.backward()
    lens_opt.step()
    requires_grad(D, True)
    return {"lens_loss": loss.detach(), "lens_adversarial": adversarial.detach(),
            "lens_reconstruction": reconstruction.detach()}


def train_iteration(step: int, G, D, lens, g_opt, d_opt, lens_opt, next_real, next_noise, args: Args) -> dict:
    """One generator iteration t: D step(s) (n_critic for wgan-gp), one G step, one lens step with λ(t).
    `next_real()` / `next_noise()` return the next real batch / latent batch (drawn identically with and
    without the lens, so both runs see the same data and noise)."""
    for _ in range(args.n_critic if args.gan == "wgan-gp" else 1):
        real = next_real()
        stats = discriminator_step(D, G, lens, d_opt, real, next_noise(), args.gan, args.gp_weight)
    stats.update(generator_step(G, D, g_opt, next_noise(), args.gan))
    if lens is not None:
        lam = lens_weight(step, args.lens_k, args.fixed_lam)
        stats.update(lens_step(lens, D, lens_opt, real, lam, args.gan))  # the last D step's real batch
    return stats


def make_optimizer(params, args: Args, device) -> torch.optim.Adam:
    fused = device.type == "cuda"  # one kernel for the whole update on GPU
    return torch.optim.Adam(params, lr=args.lr, betas=(args.beta1, args.beta2), fused=fused or None)


# ---------------------------------------------------------------- evaluation and outputs

@torch.no_grad()
def generate(G, noise: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """uint8 samples of G over a fixed noise tensor, in eval mode (mode restored)."""
    was_training = G.training
    G.eval()
    try:
        return torch.cat([to_uint8(G(noise[i:i + batch_size])).cpu() for i in range(0, len(noise), batch_size)])
    finally:
        G.train(was_training)


def mode_statistics(labels: torch.Tensor, num_modes: int = 1000) -> tuple[int, float]:
    """Modes covered (classes predicted at least once) and KL(p_generated ‖ uniform) in nats, the Stacked
    MNIST measures of VEEGAN / PacGAN."""
    p = torch.bincount(labels.cpu(), minlength=num_modes).double() / len(labels)
    nonzero = p[p > 0]
    return int((p > 0).sum()), float((nonzero * torch.log(nonzero * num_modes)).sum())


def sample_grid(G, lens, noise: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Generated samples (left) next to lensed real samples (right), the layout of Figs. 5 and 8–10."""
    generated = to_float(generate(G, noise))
    panels = [make_grid(generated, nrow=int(math.sqrt(len(noise))), normalize=True, value_range=(-1, 1))]
    if lens is not None:
        with torch.no_grad():
            lensed = lens(real).cpu()
        panels.append(make_grid(lensed.clamp(-1, 1), nrow=int(math.sqrt(len(real))), normalize=True,
                                value_range=(-1, 1)))
    gap = torch.ones(3, panels[0].shape[1], 6)
    return torch.cat([panels[0], gap, panels[1]], dim=2) if len(panels) == 2 else panels[0]


def train(args: Args, seed: int, use_lens: bool, run_dir: Path, real_images: torch.Tensor, fid: FID,
          classifier, device) -> dict:
    """Train one GAN (with or without the lens) and return its results; writes events, samples, results and
    checkpoints into run_dir."""
    run_dir.mkdir(parents=True, exist_ok=True)
    channels = real_images.shape[1]
    G, D, lens = build_models(args, channels, seed, use_lens, device)
    g_opt, d_opt = make_optimizer(G.parameters(), args, device), make_optimizer(D.parameters(), args, device)
    lens_opt = make_optimizer(lens.parameters(), args, device) if lens is not None else None
    data_gen = torch.Generator(device).manual_seed(seed)  # batch order and noise: same with and without lens
    noise_gen = torch.Generator(device).manual_seed(seed + 7)
    batches = Batches(real_images, batch_size=args.batch_size, generator=data_gen)
    next_real = lambda: batches.next()[0]  # noqa: E731
    next_noise = lambda: torch.randn(args.batch_size, args.z_dim, device=device, generator=noise_gen)  # noqa: E731
    eval_gen = torch.Generator().manual_seed(12345)  # the same evaluation noise and grid images for every run
    fid_noise = torch.randn(args.fid_samples, args.z_dim, generator=eval_gen).to(device)
    grid_noise = fid_noise[:args.num_grid]
    grid_real = real_images[torch.randperm(len(real_images), generator=eval_gen)[:args.num_grid].to(device)]
    history = {"fid": [], "modes": [], "kl": []}
    start, diverged, reason = 0, False, None
    ckpt_path = run_dir / "checkpoint.pt"
    if args.resume:
        ckpt = torch.load(args.resume, map_location=device, weights_only=False)
        for name, obj in (("G", G), ("D", D), ("lens", lens), ("g_opt", g_opt), ("d_opt", d_opt), ("lens_opt", lens_opt)):
            if obj is not None:
                obj.load_state_dict(ckpt[name])
        batches.load_state_dict(ckpt["batches"])
        noise_gen.set_state(ckpt["noise_gen"].cpu())
        start, history = ckpt["step"], ckpt["history"]
        torch.set_rng_state(ckpt["torch_rng"])  # WGAN-GP's interpolation weights come from the global RNG
        if device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["cuda_rng"])

    def save_checkpoint(step):
        state = {"G": G.state_dict(), "D": D.state_dict(), "g_opt": g_opt.state_dict(), "d_opt": d_opt.state_dict(),
                 "lens": None if lens is None else lens.state_dict(),
                 "lens_opt": None if lens is None else lens_opt.state_dict(), "batches": batches.state_dict(),
                 "noise_gen": noise_gen.get_state(), "step": step, "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None, "history": history,
                 "seed": seed, "use_lens": use_lens, "args": asdict(args)}
        torch.save(state, ckpt_path.with_suffix(".tmp"))
        os.replace(ckpt_path.with_suffix(".tmp"), ckpt_path)  # never a half-written checkpoint

    def evaluate(step):
        fake = generate(G, fid_noise)
        score = fid(fake)
        history["fid"].append([step, score])
        writer.add_scalar("eval/fid", score, step)
        if classifier is not None and args.dataset == "stacked-mnist":
            modes, kl = mode_statistics(classifier.predict(fake))
            history["modes"].append([step, modes])
            history["kl"].append([step, kl])
            writer.add_scalar("eval/modes_covered", modes, step)
            writer.add_scalar("eval/kl_to_uniform", kl, step)
        return score

    def save_samples(step):
        grid = sample_grid(G, lens, grid_noise, grid_real)
        (run_dir / "samples").mkdir(exist_ok=True)
        save_image(grid, run_dir / "samples" / f"step_{step:07d}.png")
        writer.add_image("samples/generated_lensed" if lens is not None else "samples/generated", grid, step)

    writer = SummaryWriter(str(run_dir))
    if start == 0:
        table = "\n".join(f"|{k}|{v}|" for k, v in {**asdict(args), "seed": seed, "lens": use_lens}.items())
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    step, t0, last_log, last_time = start, time.time(), start, time.time()
    progress = tqdm(range(start, args.total_steps), desc=f"{'lens' if use_lens else 'no-lens'} seed {seed}",
                    mininterval=5, disable=None)
    try:
        for step in progress:
            stats = train_iteration(step, G, D, lens, g_opt, d_opt, lens_opt, next_real, next_noise, args)
            done = step + 1
            if done % args.log_every == 0 or done == args.total_steps:
                values = dict(zip(stats, torch.stack(list(stats.values())).float().cpu().tolist()))  # one sync
                for name, value in values.items():
                    writer.add_scalar(f"charts/{name}" if name in ("d_real_score", "d_fake_score")
                                      else f"losses/{name}", value, done)
                if lens is not None:
                    writer.add_scalar("charts/lambda", lens_weight(step, args.lens_k, args.fixed_lam), done)
                now = time.time()
                writer.add_scalar("charts/steps_per_second", (done - last_log) / max(now - last_time, 1e-9), done)
                last_log, last_time = done, now
                bad = [k for k, v in values.items() if not math.isfinite(v)]
                if bad:
                    diverged, reason, step = True, f"non-finite {', '.join(bad)} at step {done}", done
                    print(f"run diverged: {reason}", file=sys.stderr)
                    break
            if done % args.sample_every == 0:
                save_samples(done)
            if done % args.eval_every == 0 and done != args.total_steps:
                progress.set_postfix(fid=f"{evaluate(done):.2f}")
                if args.save_model:
                    save_checkpoint(done)
        else:
            done = args.total_steps
        if not diverged:
            step = done
            if not history["fid"] or history["fid"][-1][0] != step:
                evaluate(step)
            if step % args.sample_every != 0:
                save_samples(step)
            if args.save_model:
                save_checkpoint(step)
    finally:  # a Ctrl-C or an error still leaves the logs flushed
        writer.close()
    finite = [sf for sf in history["fid"] if math.isfinite(sf[1])]
    best = min(finite, key=lambda sf: sf[1]) if finite else [None, None]
    result = {"seed": seed, "lens": use_lens, "gan": args.gan, "dataset": args.dataset, "steps": step,
              "diverged": diverged, "reason": reason, "fid_name": fid.name,
              "final_fid": history["fid"][-1][1] if history["fid"] and not diverged else None,
              "best_fid": best[1], "best_step": best[0], "fid_curve": history["fid"],
              "steps_per_second": (step - start) / max(time.time() - t0, 1e-9)}
    if history["modes"]:
        result.update(final_modes=history["modes"][-1][1], final_kl=history["kl"][-1][1],
                      best_modes=max(m for _, m in history["modes"]), modes_curve=history["modes"],
                      kl_curve=history["kl"])
    (run_dir / "results.json").write_text(json.dumps(result, indent=2))
    write_table(run_dir / "results.md", [result])
    return result


COLUMNS = ["lens", "seed", "steps", "final_fid", "best_fid", "best_step", "final_modes", "final_kl", "diverged"]


def write_table(path: Path, results: list[dict]) -> None:
    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else ("" if v is None else str(v))
    cols = [c for c in COLUMNS if any(c in r for r in results)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in results]
    path.write_text("\n".join(lines) + "\n")


def summarize(results: list[dict]) -> list[dict]:
    """Mean ± std over seeds of final / best FID (and Stacked MNIST modes / KL) for each configuration."""
    rows = []
    for use_lens in sorted({r["lens"] for r in results}, reverse=True):
        group = [r for r in results if r["lens"] == use_lens]
        row = {"lens": use_lens, "runs": len(group), "diverged": sum(r["diverged"] for r in group)}
        for key in ("final_fid", "best_fid", "final_modes", "final_kl"):
            values = [r[key] for r in group if r.get(key) is not None]
            if values:
                row[key] = float(np.mean(values))
                row[key + "_std"] = float(np.std(values))
        rows.append(row)
    return rows


def plot_outputs(out_dir: Path, results: list[dict], args: Args) -> None:
    """FID-vs-step curves (Figs. 5–7) and the λ schedule (Fig. 2)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        if r["fid_curve"]:
            steps, fids = zip(*r["fid_curve"])
            ax.plot(steps, fids, color="tab:blue" if r["lens"] else "tab:green", marker="o", markersize=3,
                    label=f"{'with' if r['lens'] else 'without'} lens, seed {r['seed']}")
    ax.set(xlabel="generator iteration", ylabel=results[0]["fid_name"] if results else "FID",
           title=f"{args.gan} on {args.dataset}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "fid_curves.png", dpi=110)
    plt.close(fig)
    steps = np.linspace(0, args.total_steps, 400)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(steps, [lens_weight(int(s), args.lens_k, args.fixed_lam) for s in steps])
    ax.set(xlabel="generator iteration t", ylabel="λ", title=f"λ schedule (K = {args.lens_k})"
           if args.fixed_lam is None else f"fixed λ = {args.fixed_lam}")
    fig.tight_layout()
    fig.savefig(out_dir / "lambda_schedule.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    args = tyro.cli(Args)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if device.type == "cuda":  # TF32 for training; common.fid switches it off while extracting features
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    random.seed(args.seed)
    np.random.seed(args.seed)

    if args.resume:
        ckpt = torch.load(args.resume, map_location="cpu", weights_only=False)
        run_dir, seeds_and_lens = Path(args.resume).parent, [(ckpt["seed"], ckpt["use_lens"])]
        out_dir = run_dir.parent
    else:
        run_name = args.run_name or f"{args.dataset}__{args.exp_name}__{args.seed}__{int(time.time())}"
        out_dir = Path(args.output_dir) / run_name
        seeds = range(args.seed, args.seed + args.num_seeds)
        seeds_and_lens = [(s, use) for s in seeds for use in ((True, False) if args.compare else (args.lens,))]
    out_dir.mkdir(parents=True, exist_ok=True)

    data = load_dataset(args.dataset, "train", image_size=IMAGE_SIZE, root=args.data_root,
                        num_samples=args.num_train_samples)
    if len(data) < args.batch_size:
        raise SystemExit(f"error: {len(data)} training images, fewer than one batch of {args.batch_size}")
    real_images = to_float(data.x.to(device))
    # FID always against the un-lensed training images X (Fig. 5 caption)
    fid = FID(data.x, extractor=args.fid_extractor, num_samples=args.fid_samples, root=args.data_root,
              inception_weights=args.inception_weights, device=device, dataset=args.dataset)
    classifier = None
    if args.dataset == "stacked-mnist":  # modes covered (of 1,000) and KL to uniform
        classifier = fid.classifier if args.fid_extractor == "digits" else \
            load_digit_classifier("stacked-mnist", args.data_root, device)
    print(f"{args.dataset}: {len(data)} images {tuple(data.x.shape[1:])}, {fid.name}, device {device}")

    results = []
    for seed, use_lens in seeds_and_lens:
        run_dir = Path(args.resume).parent if args.resume else out_dir / f"{'lens' if use_lens else 'no-lens'}__seed{seed}"
        result = train(args, seed, use_lens, run_dir, real_images, fid, classifier, device)
        results.append(result)
        print(f"seed {seed} {'with' if use_lens else 'without'} lens: final {result['fid_name']} "
              f"{result['final_fid']}, best {result['best_fid']} at step {result['best_step']}"
              + (f"; DIVERGED ({result['reason']})" if result["diverged"] else ""))

    if not args.resume:
        summary = summarize(results)
        (out_dir / "results.json").write_text(json.dumps({"args": asdict(args), "fid_name": fid.name,
                                                          "summary": summary, "runs": results}, indent=2))
        write_table(out_dir / "results.md", results)
        with open(out_dir / "results.md", "a") as f:
            f.write("\n| lens | runs | final FID (mean ± std) | best FID (mean ± std) | diverged |\n|---|---|---|---|---|\n")
            for row in summary:
                final = f"{row['final_fid']:.2f} ± {row['final_fid_std']:.2f}" if "final_fid" in row else "n/a"
                best = f"{row['best_fid']:.2f} ± {row['best_fid_std']:.2f}" if "best_fid" in row else "n/a"
                f.write(f"| {row['lens']} | {row['runs']} | {final} | {best} | {row['diverged']} |\n")
        with open(out_dir / "comparison.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            w.writerows([[r.get(c) for c in COLUMNS] for r in results])
        plot_outputs(out_dir, results, args)
        print(f"results in {out_dir}")
