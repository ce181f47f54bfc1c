"""Adaptive WGAN: choose the generator or the critic step by comparing loss change ratios.

Paper: X. Ouyang, G. Agam, "Accelerated WGAN update strategy with loss change rate balancing", arXiv 2020,
https://arxiv.org/abs/2008.12463

Instead of a fixed n_d critic steps per generator step, every loop iteration takes one real batch and steps
exactly one network. After the step both losses are evaluated again with the current weights, and their
relative changes r_g = |(L_g − L_g^prev) / L_g^prev|, r_d = |(L_d − L_d^prev) / L_d^prev| (eq. 4) decide the
next iteration: the critic steps if r_d > λ·r_g, otherwise the generator (Algorithm 1). Both ratios start at
1 and the first iteration only records L^prev, so with λ ≥ 1 the first two steps go to G. The script also runs
the baselines on the same loop (fixed n_d:n_g and TTUR), the WGAN (weight clipping, DCGAN 64×64) and WGAN-GP
(Gulrajani's 32×32 CIFAR model) losses, and the Dirac-GAN of Sec. 3.2. Choices the paper leaves open are
listed in docs/adaptive_wgan.md.

    # the design card's example: WGAN (weight clipping) on CIFAR-10 64×64 with the adaptive rule, λ = 3
    python adaptive_wgan.py --lam 3 --dataset cifar10
    # Table 2: fixed 5:1 vs adaptive λ ∈ {1, 3, 5, 10} (and TTUR) on equal budgets, one table + FID curves
    python adaptive_wgan.py --dataset cifar10 --strategies fixed adaptive ttur --lams 1 3 5 10
    # Sec. 3.2 / Fig. 2: the Dirac-GAN, fixed 5:1 vs adaptive from (1.5, 0.5) (seconds on any machine)
    python adaptive_wgan.py --dataset dirac
    # CPU quick run: WGAN-GP on MNIST, small model, in-domain FID
    python adaptive_wgan.py --dataset mnist --loss wgan-gp --width 32 --iterations 3000 --strategies fixed adaptive \\
        --fid-extractor digits --fid-samples 2000
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import tyro
from tqdm import tqdm

from common.datasets import DATASET_NAMES, Batches, load_dataset, to_float
from common.fid import FID

Strategy = Literal["adaptive", "fixed", "ttur"]
DIGIT_DATASETS = ("mnist", "fashion-mnist", "stacked-mnist", "fake")


@dataclass
class Args:
    # experiment
    exp_name: str = Path(__file__).stem
    """name of the experiment (part of the run name)"""
    seed: int = 1
    """seed of the weights, the batch order and the noise (every strategy of a comparison starts from the same G and D)"""
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
    """write checkpoint.pt (G, D, optimisers, rule state, data order, RNG) at every epoch end and at the end"""
    resume: str | None = None
    """run folder to continue (written with --save-model): finished runs are kept, the others go on from checkpoint.pt"""
    # data
    dataset: str = "cifar10"
    """dirac (the Dirac-GAN of Sec. 3.2, no data), cifar10, lsun-conference, lfw, mnist, fashion-mnist, celeba,
    stacked-mnist, lsun-classroom, fake (synthetic, for tests) or folder:<path>"""
    data_root: str = "data"
    """root folder of the datasets (also holds cached FID statistics)"""
    image_size: int | None = None
    """training image size (None: 64 for wgan-clip, the DCGAN setting of Sec. 4.2; 32 for wgan-gp)"""
    num_samples: int | None = None
    """keep only the first n training images (None: all)"""
    # method
    loss: Literal["wgan-clip", "wgan-gp"] = "wgan-clip"
    """WGAN with weight clipping (Tables 2-3) or WGAN-GP (Table 4)"""
    strategy: Strategy = "adaptive"
    """update strategy: adaptive (Algorithm 1), fixed n_d:n_g, or ttur (1:1 with separate learning rates)"""
    lam: float = 1.0
    """λ of Algorithm 1: the critic steps if r_d > λ·r_g (the paper's default is 1; it tries 1, 3, 5, 10)"""
    strategies: list[Strategy] | None = None
    """compare several strategies on equal iteration budgets in one invocation (overrides --strategy)"""
    lams: list[float] | None = None
    """the λ values for adaptive runs of a comparison (and extra adaptive curves for --dataset dirac)"""
    n_d: int = 5
    """critic steps per cycle of the fixed strategy (WGAN: 5)"""
    n_g: int = 1
    """generator steps per cycle of the fixed strategy"""
    ratio_eps: float = 1e-12
    """ε of the guarded ratio |L − L_prev| / (|L_prev| + ε), so that a zero previous loss cannot divide by zero"""
    # training
    epochs: int | None = None
    """length in epochs of ⌈N / batch⌉ loop iterations (None: 500 for wgan-clip, Sec. 4.1; 1000 for wgan-gp,
    Table 4's caption — Sec. 4.1 says 20k iterations instead: pass --iterations 20000 for that reading)"""
    iterations: int | None = None
    """length in loop iterations (one network step each); overrides --epochs"""
    batch_size: int = 64
    """batch size (Sec. 4: 64)"""
    z_dim: int | None = None
    """latent size (None: 100 for wgan-clip, Sec. 4.2; 128 for wgan-gp)"""
    width: int | None = None
    """network width (None: 64 = DCGAN ngf/ndf for wgan-clip; 128 = DIM of Gulrajani's model for wgan-gp)"""
    lr: float | None = None
    """learning rate of G and D for fixed/adaptive (None: RMSprop 5e-5 for wgan-clip, Adam 1e-4 for wgan-gp as in
    Sec. 4.1; Sec. 4.1 also says adaptive WGAN-GP used 3e-4 in Table 4: pass --lr 3e-4 for that)"""
    ttur_lr_g: float | None = None
    """TTUR generator learning rate (None: 1e-4 for wgan-gp as in Sec. 4.1; lr for wgan-clip)"""
    ttur_lr_d: float | None = None
    """TTUR critic learning rate (None: 3e-4 for wgan-gp as in Sec. 4.1; 3·lr for wgan-clip)"""
    clip_value: float = 0.01
    """weight clipping bound c of WGAN: every critic parameter is clamped to [−c, c] after each critic step"""
    gp_weight: float = 10.0
    """gradient-penalty weight λ_GP of WGAN-GP (Table 1: 10)"""
    # Dirac-GAN (--dataset dirac)
    dirac_h: float = 0.05
    """step size h of the Dirac-GAN updates (the paper does not give it)"""
    dirac_steps: int = 5000
    """loop iterations of each Dirac-GAN run"""
    dirac_start: tuple[float, float] = (1.5, 0.5)
    """initial (θ, ψ) (Fig. 2: (1.5, 0.5))"""
    dirac_clip: float = 0.5
    """ψ is clipped to [−clip, clip] after each critic step (Sec. 3.2: 0.5)"""
    # evaluation
    fid_every: int = 1
    """epochs between FID evaluations (the paper: every epoch); 0 turns FID off"""
    fid_samples: int = 10_000
    """generated and real images per FID (the paper does not say; 10k real train images drawn once)"""
    fid_extractor: Literal["inception", "digits"] = "inception"
    """FID features: Inception (the paper's) or the in-domain digit CNN (mnist, fashion-mnist, stacked-mnist, fake)"""
    inception_weights: str | None = None
    """local Inception FID weights (inception-2015-12-05-fid.pth) where there is no network"""
    fid_thresholds: list[float] | None = None
    """FID targets whose first reaching epoch is reported (None: 200 100 50 40 as Table 2; 100 50 30 for wgan-gp)"""
    sample_every: int = 10
    """epochs between saved sample grids (also saved at the end)"""
    log_every: int = 100
    """loop iterations between scalar logs (losses, ratios, counts) and the non-finite check of the baselines"""

    def __post_init__(self):
        def fail(message):
            raise SystemExit(f"error: {message}")
        names = tuple(n for n in DATASET_NAMES if n != "ring") + ("dirac",)
        if self.dataset not in names and not self.dataset.startswith("folder:"):
            fail(f"unknown dataset '{self.dataset}'. Valid: {', '.join(names)}, folder:<path>")
        for name in ("batch_size", "n_d", "n_g", "dirac_steps", "fid_samples", "sample_every", "log_every"):
            if getattr(self, name) <= 0:
                fail(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("epochs", "iterations", "z_dim", "width", "lr", "ttur_lr_g", "ttur_lr_d", "num_samples"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                fail(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for lam in [self.lam] + list(self.lams or []):
            if not lam > 0:
                fail(f"λ must be positive (the paper uses 1, 3, 5, 10), got {lam}")
        if self.lams is not None and "adaptive" not in (self.strategies or [self.strategy]):
            fail("--lams applies to adaptive runs: add 'adaptive' to --strategies")
        if self.dataset == "dirac" and "ttur" in (self.strategies or [self.strategy]):
            fail("the Dirac-GAN experiment compares fixed and adaptive updates; drop ttur")
        if not (self.ratio_eps > 0 and self.clip_value > 0 and self.gp_weight >= 0 and self.dirac_h > 0
                and self.dirac_clip > 0 and self.fid_every >= 0):
            fail("--ratio-eps, --clip-value, --dirac-h, --dirac-clip must be positive; --gp-weight, --fid-every ≥ 0")
        if self.fid_extractor == "digits" and self.dataset not in DIGIT_DATASETS:
            fail(f"--fid-extractor digits covers {', '.join(DIGIT_DATASETS)}, not {self.dataset}: use inception")
        if self.resume is not None and not Path(self.resume).is_dir():
            fail(f"--resume '{self.resume}' is not a run folder: pass the runs/<run_name> folder of a --save-model run")
        clip = self.loss == "wgan-clip"
        self.image_size = (64 if clip else 32) if self.image_size is None else self.image_size
        if clip and (self.image_size < 8 or self.image_size & (self.image_size - 1)):
            fail(f"the DCGAN of wgan-clip needs a power-of-two image size ≥ 8 (e.g. 64), got {self.image_size}")
        if not clip and (self.image_size < 8 or self.image_size % 8):
            fail(f"the WGAN-GP model needs an image size divisible by 8 (e.g. 32), got {self.image_size}")
        self.z_dim = self.z_dim or (100 if clip else 128)
        self.width = self.width or (64 if clip else 128)
        self.lr = self.lr or (5e-5 if clip else 1e-4)
        self.ttur_lr_g = self.ttur_lr_g or (self.lr if clip else 1e-4)
        self.ttur_lr_d = self.ttur_lr_d or (3 * self.lr if clip else 3e-4)
        self.epochs = self.epochs or (500 if clip else 1000)
        self.fid_thresholds = self.fid_thresholds or ([200.0, 100.0, 50.0, 40.0] if clip else [100.0, 50.0, 30.0])


# ---------------------------------------------------------------- the decision rule (Algorithm 1)

def change_ratio(current: float, previous: float, eps: float) -> float:
    """eq. (4) r = |(L_c − L_p) / L_p|, with |L_p| + ε in the denominator so that L_p = 0 stays finite."""
    return abs(current - previous) / (abs(previous) + eps)


class AdaptiveRule:
    """State of Algorithm 1: the ratios (initialised to 1) and the previous losses (set by the first observation).
    `critic_turn()` says which network steps next; `observe(L_g, L_d)` takes BOTH losses after every step."""

    def __init__(self, lam: float, eps: float = 1e-12):
        self.lam, self.eps = lam, eps
        self.r_g = self.r_d = 1.0
        self.prev: tuple[float, float] | None = None

    def critic_turn(self) -> bool:
        return self.r_d > self.lam * self.r_g  # strict: a tie steps the generator (Alg. 1 line 4)

    def observe(self, loss_g: float, loss_d: float) -> None:
        if self.prev is None:  # Alg. 1 lines 12-13: the first iteration sets L^p = L, so both ratios become 0
            self.prev = (loss_g, loss_d)
        self.r_g = change_ratio(loss_g, self.prev[0], self.eps)
        self.r_d = change_ratio(loss_d, self.prev[1], self.eps)
        self.prev = (loss_g, loss_d)

    def state_dict(self) -> dict:
        return {"r_g": self.r_g, "r_d": self.r_d, "prev": self.prev}

    def load_state_dict(self, state: dict) -> None:
        self.r_g, self.r_d = state["r_g"], state["r_d"]
        self.prev = None if state["prev"] is None else tuple(state["prev"])


def fixed_critic_turn(iteration: int, n_d: int, n_g: int) -> bool:
    """Fixed schedule: n_d critic iterations, then n_g generator iterations, repeated (TTUR: 1:1)."""
    return iteration % (n_d + n_g) < n_d


def sequence_stats(critic_turns) -> dict:
    """Counts and run lengths of an update sequence (True = critic step)."""
    turns = np.asarray(critic_turns, dtype=bool)
    runs = {True: [], False: []}
    if len(turns):
        edges = np.flatnonzero(np.diff(turns.astype(np.int8))) + 1
        for chunk in np.split(turns, edges):
            runs[bool(chunk[0])].append(len(chunk))
    return {"u_d": int(turns.sum()), "u_g": int((~turns).sum()), "switches": int(max(0, sum(map(len, runs.values())) - 1)),
            "longest_d_run": max(runs[True], default=0), "longest_g_run": max(runs[False], default=0),
            "mean_d_run": float(np.mean(runs[True])) if runs[True] else 0.0,
            "mean_g_run": float(np.mean(runs[False])) if runs[False] else 0.0}


# ---------------------------------------------------------------- Dirac-GAN (Sec. 3.2)

def dirac_losses(theta: float, psi: float) -> tuple[float, float]:
    """p_data = δ_1, G = δ_θ, D_ψ(x) = ψx: L_g = D(G(z)) = ψθ and L_d = D(x) − D(G(z)) = ψ(1 − θ) (eqs. 3, 8)."""
    return psi * theta, psi * (1.0 - theta)


def dirac_generator_step(theta: float, psi: float, h: float) -> tuple[float, float]:
    """eq. (6)/(10): θ ← θ + h·ψ (gradient descent of L = ψ − ψθ in θ), ψ unchanged."""
    return theta + h * psi, psi


def dirac_critic_step(theta: float, psi: float, h: float, clip: float) -> tuple[float, float]:
    """eq. (7): ψ ← clip(ψ + h(1 − θ), −clip, clip) (ascent of L in ψ, then WGAN's clipping). eq. (11)'s matrix form
    divides by θ and is not used."""
    return theta, min(clip, max(-clip, psi + h * (1.0 - theta)))


def run_dirac(strategy: Literal["adaptive", "fixed"], steps: int, h: float, lam: float = 1.0, start=(1.5, 0.5),
              clip: float = 0.5, n_d: int = 5, n_g: int = 1, eps: float = 1e-12) -> dict:
    """One Dirac-GAN trajectory: arrays theta, psi (steps + 1 points) and critic_turns (steps booleans)."""
    theta, psi = start
    rule = AdaptiveRule(lam, eps)
    thetas, psis, turns = [theta], [psi], []
    for it in range(steps):
        critic = rule.critic_turn() if strategy == "adaptive" else fixed_critic_turn(it, n_d, n_g)
        theta, psi = dirac_critic_step(theta, psi, h, clip) if critic else dirac_generator_step(theta, psi, h)
        rule.observe(*dirac_losses(theta, psi))  # both losses with the new parameters, every iteration
        thetas.append(theta), psis.append(psi), turns.append(critic)
    return {"theta": np.array(thetas), "psi": np.array(psis), "critic_turns": np.array(turns)}


# ---------------------------------------------------------------- networks

class DCGANGenerator(nn.Module):
    """WGAN's DCGAN generator: z → 4×4×(ngf·size/8) → ×2 per block (ConvT 4×4, BN, ReLU) → size×size, tanh."""

    def __init__(self, z_dim: int, width: int, channels: int, image_size: int):
        super().__init__()
        c = width * image_size // 8
        layers = [nn.ConvTranspose2d(z_dim, c, 4, 1, 0, bias=False), nn.BatchNorm2d(c), nn.ReLU(True)]
        size = 4
        while size < image_size // 2:
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(True)]
            c, size = c // 2, size * 2
        layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z.view(len(z), -1, 1, 1))


class DCGANCritic(nn.Module):
    """WGAN's DCGAN critic: Conv 4×4 stride 2 + LeakyReLU(0.2), then (Conv, BN, LeakyReLU) down to 4×4, then a
    4×4 conv to one raw score (no sigmoid)."""

    def __init__(self, width: int, channels: int, image_size: int):
        super().__init__()
        layers = [nn.Conv2d(channels, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        c, size = width, image_size // 2
        while size > 4:
            layers += [nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.2, True)]
            c, size = 2 * c, size // 2
        layers += [nn.Conv2d(c, 1, 4, 1, 0, bias=False)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).view(-1)


def dcgan_init(module: nn.Module) -> None:
    """DCGAN init: conv weights N(0, 0.02), batch-norm scale N(1, 0.02) and shift 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class GulrajaniGenerator(nn.Module):
    """Gulrajani et al.'s CIFAR-10 generator: Linear → 4·DIM×s/8×s/8 (BN, ReLU) → two ConvT 5×5 stride 2 (BN, ReLU)
    → ConvT 5×5 stride 2 → tanh."""

    def __init__(self, z_dim: int, width: int, channels: int, image_size: int):
        super().__init__()
        self.start, self.width = image_size // 8, width
        self.project = nn.Sequential(nn.Linear(z_dim, 4 * width * self.start ** 2),
                                     nn.BatchNorm1d(4 * width * self.start ** 2), nn.ReLU(True))
        self.body = nn.Sequential(
            nn.ConvTranspose2d(4 * width, 2 * width, 5, 2, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU(True),
            nn.ConvTranspose2d(2 * width, width, 5, 2, 2, 1), nn.BatchNorm2d(width), nn.ReLU(True),
            nn.ConvTranspose2d(width, channels, 5, 2, 2, 1), nn.Tanh())

    def forward(self, z):
        return self.body(self.project(z).view(len(z), 4 * self.width, self.start, self.start))


class GulrajaniCritic(nn.Module):
    """Gulrajani et al.'s CIFAR-10 critic, no batch norm (it would break the per-sample penalty): three Conv 5×5
    stride 2 + LeakyReLU(0.2), then Linear → one score."""

    def __init__(self, width: int, channels: int, image_size: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 5, 2, 2), nn.LeakyReLU(0.2, True),
            nn.Conv2d(width, 2 * width, 5, 2, 2), nn.LeakyReLU(0.2, True),
            nn.Conv2d(2 * width, 4 * width, 5, 2, 2), nn.LeakyReLU(0.2, True),
            nn.Flatten(), nn.Linear(4 * width * (image_size // 8) ** 2, 1))

    def forward(self, x):
        return self.net(x).view(-1)


def build_models(loss: str, z_dim: int, width: int, channels: int, image_size: int, seed: int, device):
    """G and D from `seed` alone, so every strategy of a comparison starts from the same weights."""
    torch.manual_seed(seed)
    if loss == "wgan-clip":
        G, D = DCGANGenerator(z_dim, width, channels, image_size), DCGANCritic(width, channels, image_size)
        dcgan_init(G), dcgan_init(D)
    else:  # PyTorch's default init (Gulrajani's TF code uses its own He/Glorot variants; not matched)
        G, D = GulrajaniGenerator(z_dim, width, channels, image_size), GulrajaniCritic(width, channels, image_size)
    return G.to(device), D.to(device)


def make_optimizer(loss: str, params, lr: float, device):
    """WGAN: RMSprop (PyTorch defaults, as the WGAN code); WGAN-GP: Adam betas (0.5, 0.9) (Sec. 4.1)."""
    if loss == "wgan-clip":
        return torch.optim.RMSprop(params, lr=lr)
    return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9), fused=torch.device(device).type == "cuda")


# ---------------------------------------------------------------- losses and steps (Table 1)

def clip_weights(D: nn.Module, c: float) -> None:
    """WGAN's Lipschitz constraint: clamp every critic parameter (batch-norm scale and shift included) to [−c, c]."""
    with torch.no_grad():
        for p in D.parameters():
            p.clamp_(-c, c)


def gradient_penalty(D: nn.Module, real, fake, alpha, create_graph: bool = True) -> torch.Tensor:
    """Gulrajani et al.: mean over samples of (‖∇_x̂ D(x̂)‖₂ − 1)², x̂ = α·x + (1 − α)·G(z), α ~ U[0, 1] per sample,
    the norm over all of C×H×W."""
    x_hat = (alpha * real + (1 - alpha) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(D(x_hat).sum(), x_hat, create_graph=create_graph)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def critic_step(G, D, opt_d, real, z, alpha, loss: str, clip_value: float, gp_weight: float) -> torch.Tensor:
    """One critic step on L_d = D(G(z)) − D(x) (+ λ_GP·GP); returns the fake batch (still valid: G did not change)."""
    with torch.no_grad():
        fake = G(z)
    critic_loss = D(fake).mean() - D(real).mean()
    if loss == "wgan-gp":
        critic_loss = critic_loss + gp_weight * gradient_penalty(D, real, fake, alpha)
    opt_d.zero_grad(set_to_none=True)
    critic_loss.backward()
    opt_d.step()
    if loss == "wgan-clip":
        clip_weights(D, clip_value)
    return fake


def generator_step(G, D, opt_g, z) -> None:
    """One generator step on L_g = −D(G(z)) (D's parameters frozen: no gradient is computed for them)."""
    requires_grad(D, False)
    gen_loss = -D(G(z)).mean()
    opt_g.zero_grad(set_to_none=True)
    gen_loss.backward()
    opt_g.step()
    requires_grad(D, True)


def evaluate_losses(G, D, real, z, alpha, loss: str, gp_weight: float, fake=None) -> torch.Tensor:
    """Both losses with the CURRENT weights on this iteration's batch, no parameter gradients:
    tensor [L_g, L_d, GP] with L_g = −mean D(G(z)) and L_d = mean D(G(z)) − mean D(x) + λ_GP·GP (the losses the
    networks minimise; the overall sign does not matter to eq. (4)). `fake` = G(z) may be passed when G is unchanged."""
    with torch.no_grad():
        fake = G(z) if fake is None else fake
        real_score, fake_score = D(real).mean(), D(fake).mean()
    penalty = torch.zeros((), device=real.device)
    if loss == "wgan-gp":  # the penalty needs ∇_x̂ D: autograd w.r.t. the input only, no graph kept
        with torch.enable_grad():
            penalty = gradient_penalty(D, real, fake, alpha, create_graph=False).detach()
    return torch.stack([-fake_score, fake_score - real_score + gp_weight * penalty, penalty])


def loop_iteration(G, D, opt_g, opt_d, real, z, alpha, critic: bool, loss: str, clip_value: float,
                   gp_weight: float, evaluate: bool) -> torch.Tensor | None:
    """One loop iteration: step the critic or the generator on this batch, then (if asked) re-evaluate both losses."""
    fake = critic_step(G, D, opt_d, real, z, alpha, loss, clip_value, gp_weight) if critic else None
    if not critic:
        generator_step(G, D, opt_g, z)
    return evaluate_losses(G, D, real, z, alpha, loss, gp_weight, fake) if evaluate else None


# ---------------------------------------------------------------- one training run

def first_reached(history: list[dict], thresholds: list[float]) -> dict:
    """The first epoch whose FID is ≤ each threshold (None: not reached, '*' in the paper's tables)."""
    out = {}
    for t in thresholds:
        hit = [h["epoch"] for h in history if h["fid"] is not None and h["fid"] <= t]
        out[f"{t:g}"] = hit[0] if hit else None
    return out


def run_label(strategy: str, lam: float, args: Args) -> str:
    if strategy == "adaptive":
        return f"adaptive_lam{lam:g}"
    return f"fixed_{args.n_d}-{args.n_g}" if strategy == "fixed" else "ttur"


def train_run(args: Args, strategy: str, lam: float, images: torch.Tensor, fid: FID | None, run_dir: Path,
              device: torch.device) -> dict:
    """Train one configuration; writes events, samples, results.json/md (and checkpoint.pt with --save-model)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "results.json").exists() and args.resume:
        return json.loads((run_dir / "results.json").read_text())  # finished before the interruption
    lr_g, lr_d = (args.ttur_lr_g, args.ttur_lr_d) if strategy == "ttur" else (args.lr, args.lr)
    n_d, n_g = (1, 1) if strategy == "ttur" else (args.n_d, args.n_g)
    G, D = build_models(args.loss, args.z_dim, args.width, images.shape[1], args.image_size, args.seed, device)
    opt_g, opt_d = make_optimizer(args.loss, G.parameters(), lr_g, device), make_optimizer(args.loss, D.parameters(), lr_d, device)
    data_gen = torch.Generator(device).manual_seed(args.seed)
    noise_gen = torch.Generator(device).manual_seed(args.seed + 1)
    batches = Batches(images, batch_size=args.batch_size, generator=data_gen)
    iters_per_epoch = math.ceil(len(images) / args.batch_size)  # Table 2: u_g + u_d = epochs × ⌈N / 64⌉
    total = args.iterations or args.epochs * iters_per_epoch
    fixed_noise = torch.randn(64, args.z_dim, generator=torch.Generator().manual_seed(args.seed + 2)).to(device)
    rule = AdaptiveRule(lam, args.ratio_eps)
    state = {"iteration": 0, "u_g": 0, "u_d": 0, "history": [], "diverged": False, "reason": None, "train_seconds": 0.0}
    ckpt_path = run_dir / "checkpoint.pt"
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        G.load_state_dict(ckpt["G"]), D.load_state_dict(ckpt["D"])
        opt_g.load_state_dict(ckpt["opt_g"]), opt_d.load_state_dict(ckpt["opt_d"])
        batches.load_state_dict(ckpt["batches"]), noise_gen.set_state(ckpt["noise_gen"])
        rule.load_state_dict(ckpt["rule"])
        state = ckpt["state"]
        torch.set_rng_state(ckpt["torch_rng"])
        print(f"resumed {run_dir} at iteration {state['iteration']}")
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(run_dir), purge_step=state["iteration"] or None)
    if state["iteration"] == 0:
        hparams = {**asdict(args), "strategy": strategy, "lam": lam, "lr_g": lr_g, "lr_d": lr_d, "n_d": n_d, "n_g": n_g,
                   "iterations_per_epoch": iters_per_epoch, "total_iterations": total}
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in hparams.items()))

    def save_checkpoint():
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"G": G.state_dict(), "D": D.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                    "batches": batches.state_dict(), "noise_gen": noise_gen.get_state(), "rule": rule.state_dict(),
                    "state": state, "torch_rng": torch.get_rng_state(), "args": asdict(args), "strategy": strategy,
                    "lam": lam}, tmp)
        os.replace(tmp, ckpt_path)  # write then rename: an interrupted save keeps the previous checkpoint

    def end_of_epoch(epoch: int, last: bool):
        record = {"epoch": epoch, "iteration": state["iteration"], "u_g": state["u_g"], "u_d": state["u_d"], "fid": None}
        if fid is not None and (epoch % args.fid_every == 0 or last):
            noise = torch.randn(fid.num_real, args.z_dim, generator=torch.Generator().manual_seed(args.seed + 3))
            record["fid"] = fid.score_generator(G, noise.to(device), batch_size=256)
            writer.add_scalar("eval/fid", record["fid"], state["iteration"])
            writer.add_scalar("eval/fid_vs_epoch", record["fid"], epoch)
        state["history"].append(record)
        if epoch % args.sample_every == 0 or last:
            from torchvision.utils import make_grid, save_image  # imported here: torchvision takes seconds to load
            G.eval()
            with torch.no_grad():
                grid = make_grid(G(fixed_noise).cpu(), nrow=8, normalize=True, value_range=(-1, 1))
            G.train()
            (run_dir / "samples").mkdir(exist_ok=True)
            save_image(grid, run_dir / "samples" / f"epoch_{epoch:04d}.png")
            writer.add_image("samples", grid, state["iteration"])
        if args.save_model:
            save_checkpoint()
        return record

    interrupted = False
    window_d = 0  # critic steps since the last log
    bar = tqdm(total=total, initial=state["iteration"], desc=run_dir.name, dynamic_ncols=True, mininterval=1.0)
    start, start_iter = time.perf_counter(), state["iteration"]
    try:
        while state["iteration"] < total:
            it = state["iteration"]
            (x_uint8,) = batches.next()
            real = to_float(x_uint8)
            z = torch.randn(args.batch_size, args.z_dim, device=device, generator=noise_gen)
            alpha = torch.rand(args.batch_size, 1, 1, 1, device=device, generator=noise_gen)
            critic = rule.critic_turn() if strategy == "adaptive" else fixed_critic_turn(it, n_d, n_g)
            log_now = (it + 1) % args.log_every == 0
            losses = loop_iteration(G, D, opt_g, opt_d, real, z, alpha, critic, args.loss, args.clip_value,
                                    args.gp_weight, evaluate=strategy == "adaptive" or log_now)
            state["u_d" if critic else "u_g"] += 1
            window_d += critic
            state["iteration"] = it + 1
            if strategy == "adaptive":
                # The next iteration's network is control flow chosen from these two numbers, so the rule needs
                # them on the host now: one sync per iteration is inherent to Algorithm 1 (logging stays every k).
                loss_g, loss_d, _ = losses.tolist()
                if not (math.isfinite(loss_g) and math.isfinite(loss_d)):
                    state["diverged"], state["reason"] = True, f"non-finite loss at iteration {it + 1}"
                    break
                rule.observe(loss_g, loss_d)
            if log_now:
                values = losses.tolist()
                if not all(map(math.isfinite, values)):
                    state["diverged"], state["reason"] = True, f"non-finite loss at iteration {it + 1}"
                    break
                step = state["iteration"]
                writer.add_scalar("losses/generator", values[0], step)
                writer.add_scalar("losses/critic", values[1], step)
                writer.add_scalar("losses/gradient_penalty", values[2], step)
                writer.add_scalar("losses/wasserstein_estimate", args.gp_weight * values[2] - values[1], step)
                if strategy == "adaptive":
                    writer.add_scalar("charts/r_g", rule.r_g, step)
                    writer.add_scalar("charts/r_d", rule.r_d, step)
                writer.add_scalar("charts/critic_step_fraction", window_d / args.log_every, step)
                writer.add_scalar("charts/critic_stepped", float(critic), step)
                writer.add_scalar("charts/u_d", state["u_d"], step)
                writer.add_scalar("charts/u_g", state["u_g"], step)
                speed = (step - start_iter) / (time.perf_counter() - start)
                writer.add_scalar("charts/iterations_per_s", speed, step)
                window_d = 0
                bar.set_postfix(L_d=f"{values[1]:.3g}", u_g=state["u_g"], u_d=state["u_d"], it_s=f"{speed:.1f}")
            bar.update(1)
            if state["iteration"] % iters_per_epoch == 0 or state["iteration"] == total:
                epoch = math.ceil(state["iteration"] / iters_per_epoch)
                state["train_seconds"] += time.perf_counter() - start
                record = end_of_epoch(epoch, state["iteration"] == total)
                if record["fid"] is not None:
                    bar.write(f"{run_dir.name} epoch {epoch}: FID {record['fid']:.2f} u_g {state['u_g']} u_d {state['u_d']}")
                start, start_iter = time.perf_counter(), state["iteration"]
    except KeyboardInterrupt:
        interrupted = True
        state["reason"] = f"interrupted at iteration {state['iteration']}"
    finally:
        bar.close()
    state["train_seconds"] += time.perf_counter() - start
    if state["diverged"]:
        print(f"{run_dir.name}: stopped, {state['reason']}")
    if args.save_model:
        save_checkpoint()
        torch.save(G.state_dict(), run_dir / "generator.pt")
    writer.close()
    summary = summarize_run(args, strategy, lam, state, total, iters_per_epoch, fid, lr_g, lr_d, n_d, n_g)
    (run_dir / "results.json" if not interrupted else run_dir / "results_partial.json").write_text(json.dumps(summary, indent=2))
    write_table(run_dir / "results.md", [summary], args, history=state["history"])
    if interrupted:
        raise KeyboardInterrupt
    return summary


def summarize_run(args, strategy, lam, state, total, iters_per_epoch, fid, lr_g, lr_d, n_d, n_g) -> dict:
    scored = [h for h in state["history"] if h["fid"] is not None]
    best = min(scored, key=lambda h: h["fid"]) if scored else None
    return {"label": run_label(strategy, lam, args), "strategy": strategy, "lam": lam if strategy == "adaptive" else None,
            "loss": args.loss, "dataset": args.dataset, "n_d": n_d, "n_g": n_g, "lr_g": lr_g, "lr_d": lr_d,
            "iterations": state["iteration"], "budget_iterations": total, "iterations_per_epoch": iters_per_epoch,
            "u_g": state["u_g"], "u_d": state["u_d"], "diverged": state["diverged"], "reason": state["reason"],
            "fid_name": None if fid is None else fid.name, "reached_epoch": first_reached(state["history"], args.fid_thresholds),
            "best_epoch": None if best is None else best["epoch"], "best_fid": None if best is None else best["fid"],
            "best_u_g": None if best is None else best["u_g"], "best_u_d": None if best is None else best["u_d"],
            "iterations_per_s": state["iteration"] / state["train_seconds"] if state["train_seconds"] else None,
            "history": state["history"]}


def model_name(summary: dict) -> tuple[str, str]:
    """(Model, Parameters) cells in the paper's wording."""
    base = "WGAN" if summary["loss"] == "wgan-clip" else "WGAN-GP"
    if summary["strategy"] == "adaptive":
        return f"adaptive {base}", f"λ = {summary['lam']:g}"
    if summary["strategy"] == "ttur":
        return f"{base} TTUR", f"n_d = 1, n_g = 1 (lr_g {summary['lr_g']:g}, lr_d {summary['lr_d']:g})"
    return base, f"n_d = {summary['n_d']}, n_g = {summary['n_g']}"


def write_table(path: Path, summaries: list[dict], args: Args, history: list[dict] | None = None) -> None:
    """Tables 2-4's layout: first epoch reaching each FID target ('*' = never), best epoch and FID, u_g and u_d at it."""
    thresholds = [f"{t:g}" for t in args.fid_thresholds]
    head = ["Model", "Parameters"] + [f"FID ≤ {t} (epoch)" for t in thresholds] + ["best epoch", "best FID", "u_g", "u_d",
                                                                                 "total u_g", "total u_d", "note"]
    rows = []
    for s in summaries:
        cells = list(model_name(s)) + ["*" if s["reached_epoch"][t] is None else str(s["reached_epoch"][t]) for t in thresholds]
        cells += ["-" if s[k] is None else (f"{s[k]:.2f}" if k == "best_fid" else str(s[k]))
                  for k in ("best_epoch", "best_fid", "best_u_g", "best_u_d")]
        cells += [str(s["u_g"]), str(s["u_d"]), s["reason"] or ""]
        rows.append(cells)
    fid_name = next((s["fid_name"] for s in summaries if s["fid_name"]), "FID off")
    lines = [f"# {args.dataset}, {args.loss}, {summaries[0]['budget_iterations']} loop iterations per run "
             f"({summaries[0]['iterations_per_epoch']} per epoch); {fid_name}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    if history is not None:
        lines += ["", "| epoch | iteration | FID | u_g | u_d |", "|---|---|---|---|---|"]
        for h in history:
            score = "-" if h["fid"] is None else f"{h['fid']:.2f}"
            lines.append(f"| {h['epoch']} | {h['iteration']} | {score} | {h['u_g']} | {h['u_d']} |")
    path.write_text("\n".join(lines) + "\n")
    if len(summaries) > 1:
        with open(path.with_suffix(".csv"), "w", newline="") as f:
            csv.writer(f).writerows([head] + rows)


def plot_fid_curves(path: Path, summaries: list[dict], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in summaries:
        pts = [(h["epoch"], h["fid"]) for h in s["history"] if h["fid"] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=" ".join(model_name(s)))
    ax.set_xlabel("epoch (⌈N/batch⌉ loop iterations)"), ax.set_ylabel("FID"), ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7), ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)


# ---------------------------------------------------------------- Dirac-GAN experiment

def dirac_experiment(args: Args, run_dir: Path) -> list[dict]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    wanted = args.strategies or ["fixed", "adaptive"]
    from torch.utils.tensorboard import SummaryWriter
    configs = ([("fixed", None)] if "fixed" in wanted else []) + \
        ([("adaptive", lam) for lam in (args.lams or [args.lam])] if "adaptive" in wanted else [])
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    results, fig = [], plt.figure(figsize=(4 * (len(configs) + 1), 4))
    ax_d = fig.add_subplot(1, len(configs) + 1, len(configs) + 1)
    for i, (strategy, lam) in enumerate(configs):
        traj = run_dirac(strategy, args.dirac_steps, args.dirac_h, lam or 1.0, args.dirac_start, args.dirac_clip,
                         args.n_d, args.n_g, args.ratio_eps)
        dist = np.hypot(traj["theta"] - 1.0, traj["psi"])
        tail = dist[len(dist) // 2:]
        label = f"fixed {args.n_d}:{args.n_g}" if strategy == "fixed" else f"adaptive λ={lam:g}"
        res = {"label": label, "strategy": strategy, "lam": lam, "final_theta": float(traj["theta"][-1]),
               "final_psi": float(traj["psi"][-1]), "final_distance": float(dist[-1]),
               "min_distance_second_half": float(tail.min()), "max_distance_second_half": float(tail.max()),
               **sequence_stats(traj["critic_turns"])}
        results.append(res)
        for step in range(0, len(dist), max(1, len(dist) // 500)):
            writer.add_scalar(f"dirac/distance_{label.replace(' ', '_').replace(':', '-')}", dist[step], step)
        ax = fig.add_subplot(1, len(configs) + 1, i + 1)
        lim = max(1.0, float(np.abs(traj["psi"]).max()) + 0.2)
        ax.axhspan(args.dirac_clip, 10, color="grey", alpha=0.2), ax.axhspan(-10, -args.dirac_clip, color="grey", alpha=0.2)
        ax.plot(traj["theta"], traj["psi"], lw=0.6)
        ax.plot(*args.dirac_start, "o", color="red"), ax.plot(traj["theta"][-1], traj["psi"][-1], "o", mfc="none", color="red", ms=9)
        ax.plot(1, 0, "k+", ms=10)
        ax.set_xlim(min(0.0, traj["theta"].min() - 0.1), max(2.0, traj["theta"].max() + 0.1)), ax.set_ylim(-lim, lim)
        ax.set_xlabel("θ"), ax.set_ylabel("ψ")
        ax.set_title(f"{label}: final dist {dist[-1]:.3f}\nu_g {res['u_g']}, u_d {res['u_d']}", fontsize=9)
        ax_d.plot(dist, lw=0.8, label=label)
    ax_d.set_xlabel("iteration"), ax_d.set_ylabel("distance to (1, 0)"), ax_d.set_yscale("log"), ax_d.legend(fontsize=8)
    fig.suptitle(f"Dirac-GAN, h = {args.dirac_h}, {args.dirac_steps} iterations, ψ clipped to ±{args.dirac_clip}", fontsize=10)
    fig.tight_layout(), fig.savefig(run_dir / "dirac_phase_plane.png", dpi=100), plt.close(fig)
    writer.close()
    (run_dir / "results.json").write_text(json.dumps({"h": args.dirac_h, "steps": args.dirac_steps,
                                                      "start": list(args.dirac_start), "runs": results}, indent=2))
    keys = ["final_theta", "final_psi", "final_distance", "min_distance_second_half", "max_distance_second_half",
            "u_g", "u_d", "switches", "longest_g_run", "longest_d_run", "mean_g_run", "mean_d_run"]
    lines = [f"# Dirac-GAN, h = {args.dirac_h}, {args.dirac_steps} iterations from {tuple(args.dirac_start)}", "",
             "| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    lines += ["| " + r["label"] + " | " + " | ".join(f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k]) for k in keys)
              + " |" for r in results]
    (run_dir / "results.md").write_text("\n".join(lines) + "\n")
    return results


if __name__ == "__main__":
    args = tyro.cli(Args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # TF32 for training; the FID wrapper turns it off while extracting features
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.resume:
        run_dir = Path(args.resume)
    else:
        run_name = args.run_name or f"{args.dataset}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = Path(args.output_dir) / run_name

    if args.dataset == "dirac":
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "args.json").write_text(json.dumps(asdict(args), indent=2))
        for r in dirac_experiment(args, run_dir):
            print(f"{r['label']:>16}: final (θ, ψ) = ({r['final_theta']:.4f}, {r['final_psi']:.4f}), distance to (1, 0) "
                  f"{r['final_distance']:.4f} (second half: {r['min_distance_second_half']:.4f}–"
                  f"{r['max_distance_second_half']:.4f}), u_g {r['u_g']}, u_d {r['u_d']}, switches {r['switches']}")
        print(f"wrote {run_dir}/dirac_phase_plane.png and results.md")
        raise SystemExit(0)

    data = load_dataset(args.dataset, "train", image_size=args.image_size, root=args.data_root,
                        num_samples=args.num_samples)
    if len(data) < args.batch_size:
        raise SystemExit(f"error: {len(data)} training images are fewer than one batch of {args.batch_size}: "
                         "lower --batch-size or use more data")
    images = data.x.to(device)  # uint8 on the device (CIFAR-10 64×64: 0.6 GB); batches are converted to float
    fid = None
    if args.fid_every > 0:
        n_fid = min(args.fid_samples, len(data))
        if n_fid < args.fid_samples:
            print(f"note: the data has {len(data)} images, so FID uses {n_fid} real / {n_fid} generated")
        fid = FID(data.x, extractor=args.fid_extractor, num_samples=n_fid, root=args.data_root,
                  inception_weights=args.inception_weights, device=device, dataset=args.dataset)
        print(f"evaluating with {fid.name} every {args.fid_every} epoch(s)")
    run_dir.mkdir(parents=True, exist_ok=True)  # only now: a missing dataset or FID weights leaves no empty run folder
    (run_dir / "args.json").write_text(json.dumps(asdict(args), indent=2))

    configs = []
    for strategy in (args.strategies or [args.strategy]):
        lams = (args.lams or [args.lam]) if strategy == "adaptive" else [None]
        configs += [(strategy, lam) for lam in lams]
    single = len(configs) == 1
    summaries = []
    for strategy, lam in configs:
        sub_dir = run_dir if single else run_dir / run_label(strategy, lam, args)
        try:
            summaries.append(train_run(args, strategy, lam or args.lam, images, fid, sub_dir, device))
        except KeyboardInterrupt:
            raise SystemExit(f"interrupted: partial results and the last checkpoint are in {sub_dir}") from None
    if not single:  # the comparison table (a single run wrote its own results.md with the per-epoch table)
        write_table(run_dir / "results.md", summaries, args)
        (run_dir / "results.json").write_text(json.dumps(summaries, indent=2))
    if fid is not None:
        plot_fid_curves(run_dir / "fid_curves.png", summaries, f"{args.dataset}, {args.loss}; {fid.name}")
    for s in summaries:
        print(f"{' '.join(model_name(s)):>40}: best FID {s['best_fid']} (epoch {s['best_epoch']}), "
              f"reached {s['reached_epoch']}, u_g {s['u_g']}, u_d {s['u_d']}" + (f", {s['reason']}" if s["reason"] else ""))
    print(f"results in {run_dir}")
