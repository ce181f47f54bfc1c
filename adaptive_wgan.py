"""Adaptive WGAN: step the generator or the critic by comparing loss change ratios.

Paper: X. Ouyang, G. Agam, "Accelerated WGAN update strategy with loss change rate balancing", arXiv 2020,
https://arxiv.org/abs/2008.12463

Instead of n_d critic steps per generator step, every loop iteration takes one batch and steps ONE network: the critic
if r_d > λ·r_g, else the generator, where r = |(L − L_prev) / L_prev| is each loss's relative change over the last
iteration (eq. 4, Algorithm 1). Baselines (fixed n_d:1, TTUR) run on the same loop; losses: WGAN with clipping (DCGAN
64×64, Tables 2-3), WGAN-GP and Table 4's "Gradient Penalty" (R1, Mescheder et al.) at 32×32; and the Dirac-GAN.

    python adaptive_wgan.py --dataset dirac             # Sec. 3.2 / Fig. 2: fixed 5:1 vs adaptive, seconds on a CPU
    python adaptive_wgan.py --lam 3 --dataset cifar10   # WGAN (clipping) on CIFAR-10 64×64, adaptive λ = 3
    python adaptive_wgan.py --preset table4             # Table 4: WGAN-GP and R1 × fixed / TTUR / adaptive
    python adaptive_wgan.py --preset cpu-mini           # MNIST WGAN-GP, fixed 5:1 vs adaptive, ~30 min on 2 cores
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, Literal, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm import tqdm

from common.datasets import Batches, load_dataset, to_float
from common.fid import DIGIT_DATASETS, FID

Loss, Strategy = Literal["wgan-clip", "wgan-gp", "r1"], Literal["fixed", "ttur", "adaptive"]
PAPER_NAMES = {"wgan-clip": "WGAN", "wgan-gp": "WGAN-GP", "r1": "Gradient Penalty"}  # the tables' row names
RATIO_EPS = 1e-12  # eq. (4)'s denominator is |L_prev| + ε, so a zero previous loss gives a large but finite ratio
TIE_TOL = 1e-6  # relative tie tolerance of the rule: rounding cannot decide whether r_d > λ·r_g when they are equal
LOG_EVERY, SAMPLE_EVERY = 100, 10  # loop iterations between scalar logs; epochs between sample grids (and the end)
DIRAC_START, DIRAC_CLIP = (1.5, 0.5), 0.5  # Fig. 2's start (θ, ψ) and Sec. 3.2's Lipschitz constraint ψ ∈ [−0.5, 0.5]
METRIC_TAGS = {"fid": "fid", "kid": "kid_mean", "is": "is_mean", "precision": "precision", "recall": "recall"}


@dataclass
class Args:
    # experiment
    preset: Literal["default", "table2", "table3-lsun", "table3-lfw", "table4", "cpu-mini"] = "default"
    """paper experiment to start from (every other flag overrides it): default (Table 2's WGAN, one adaptive run),
    table2, table3-lsun, table3-lfw, table4 (all rows but Unbalanced GAN), cpu-mini (MNIST WGAN-GP)"""
    seed: int = 1
    """seed of the weights, data order and noise (every configuration starts from the same G and D)"""
    track: bool = False
    """log to Weights & Biases (TensorBoard synced; WANDB_MODE=offline is respected)"""
    wandb_project_name: str = "gan-stability"
    """W&B project of --track"""
    output_dir: str = "runs"
    """folder that receives the run folder"""
    run_name: str | None = None
    """run folder name (default {dataset}__adaptive_wgan__{seed}__{date-time}-{random})"""
    save_model: bool = False
    """write checkpoint.pt per configuration (every epoch end, the end, Ctrl-C): needed by --resume"""
    resume: str | None = None
    """run folder to continue; its args.json is the default and flags given with it override it (e.g. --epochs)"""
    # data
    dataset: Literal["dirac", "cifar10", "lsun-conference", "lfw", "mnist", "fashion-mnist", "stacked-mnist",
                     "celeba", "lsun-classroom", "fake"] = "cifar10"
    """dirac: the Dirac-GAN of Sec. 3.2 (no data); fake: synthetic images (tests)"""
    data_root: str = "data"
    """datasets, cached FID statistics and digit classifiers"""
    image_size: int = 64
    """training image size (Sec. 4.2: 64 for WGAN; 32 for WGAN-GP and Gradient Penalty)"""
    num_train: int = 0
    """keep the first n training images (0 = all)"""
    # method
    losses: Annotated[list[Loss], tyro.conf.arg(aliases=("--loss",))] = field(default_factory=lambda: ["wgan-clip"])
    """wgan-clip (Tables 2-3), wgan-gp, r1 (Table 4's Gradient Penalty); several: one configuration each"""
    strategies: Annotated[list[Strategy], tyro.conf.arg(aliases=("--strategy",))] = field(
        default_factory=lambda: ["adaptive"])
    """adaptive (Algorithm 1), fixed (n_d:1), ttur (1:1, two learning rates); several: one configuration each"""
    lams: Annotated[list[float], tyro.conf.arg(aliases=("--lam",))] = field(default_factory=lambda: [1.0])
    """λ of Algorithm 1, the critic steps if r_d > λ·r_g (the paper: 1 3 5 10); several: one configuration each"""
    n_critic: int = 5
    """critic steps per generator step of the fixed strategy for wgan-clip and wgan-gp (Sec. 4.1: 5)"""
    r1_n_critic: int = 1
    """critic steps per generator step of the fixed strategy for r1 (Table 4: 1, Mescheder et al.'s setting)"""
    clip_value: float = 0.01
    """weight clipping bound c of wgan-clip: every critic parameter in [−c, c] from construction on"""
    gp_weight: float = 10.0
    """λ_GP of wgan-gp (Table 1: 10) and γ of r1's γ/2·E‖∇D(x)‖² (Mescheder et al.: 10)"""
    dirac_h: float = 0.05
    """Dirac-GAN step size h (the paper does not give it)"""
    dirac_steps: int = 5000
    """Dirac-GAN loop iterations per configuration"""
    # training
    epochs: int = 500
    """epochs of ⌈N / batch⌉ loop iterations, one network step each (Sec. 4.1: 500; Table 4: 1000)"""
    batch_size: int = 64
    """batch size (Sec. 4: 64)"""
    z_dim: int = 100
    """latent size (Sec. 4.2: 100 for WGAN, 128 for WGAN-GP and Gradient Penalty)"""
    width: int = 64
    """network width: 64 = DCGAN's ngf/ndf, 128 = DIM of Gulrajani's model"""
    lr: float = 5e-5
    """G and D learning rate of fixed, and of adaptive without --adaptive-lr (Sec. 4.1: 5e-5 WGAN, 1e-4 WGAN-GP)"""
    adaptive_lr: float = 0.0
    """G and D learning rate of the adaptive strategy (0 = --lr; Table 4: 3e-4 "in order to keep in step")"""
    ttur_lr_g: float = 5e-5
    """TTUR generator learning rate (Sec. 4.1: 1e-4; the paper has no TTUR row for WGAN)"""
    ttur_lr_d: float = 1.5e-4
    """TTUR critic learning rate (Sec. 4.1: 3e-4)"""
    # evaluation
    fid_every: int = 1
    """epochs between metric evaluations (the paper: every epoch; 0 = off)"""
    fid_samples: int = 10_000
    """real and generated images per evaluation (the real ones drawn once from the training set)"""
    fid_extractor: Literal["inception", "digits"] = "inception"
    """Inception (the paper's; gives IS) or the in-domain digit CNN (mnist, fashion-mnist, stacked-mnist, fake)"""
    inception_weights: str | None = None
    """local Inception FID weights (inception-2015-12-05-fid.pth) for machines without network"""
    fid_thresholds: list[float] = field(default_factory=lambda: [200.0, 100.0, 50.0, 40.0])
    """FID targets whose first reaching epoch is reported (Table 2: 200 100 50 40; Table 4: 100 50 30)"""
    # performance
    cuda: bool = True
    """use CUDA when available"""
    threads: int = 0
    """torch CPU threads (0 = torch's default)"""
    matmul_precision: Literal["auto", "highest", "high", "medium"] = "auto"
    """training matmuls: highest = full float32; high = TF32 on CUDA (float32 elsewhere); medium = bf16-backed
    float32 on capable CPUs/GPUs (about 2× on a recent CPU); auto = high on CUDA, highest on CPU. Metrics: always full"""
    compile: bool = False
    """torch.compile G and D (inductor); the penalties' double backward runs through the uncompiled D"""


GP_SETUP = dict(image_size=32, z_dim=128, width=128, lr=1e-4, ttur_lr_g=1e-4, ttur_lr_d=3e-4,  # Sec. 4.1-4.2
                fid_thresholds=[100.0, 50.0, 30.0])  # Table 4
TABLE3 = dict(strategies=["fixed", "adaptive"], lams=[1.0, 10.0], fid_thresholds=[200.0, 100.0, 50.0])
PRESETS: dict[str, Args] = {
    "default": Args(),  # Table 2's WGAN: CIFAR-10 64×64, RMSprop 5e-5, z 100, 500 epochs, FID every epoch
    "table2": replace(Args(), preset="table2", strategies=["fixed", "adaptive"], lams=[1.0, 3.0, 5.0, 10.0]),
    "table3-lsun": replace(Args(), preset="table3-lsun", dataset="lsun-conference", **TABLE3),
    "table3-lfw": replace(Args(), preset="table3-lfw", dataset="lfw", **TABLE3),
    # Table 4: 32×32 CIFAR-10, 1000 epochs (caption); adaptive rows at 3e-4 for G and D, TTUR 1e-4 / 3e-4 (Sec. 4.1)
    "table4": replace(Args(), preset="table4", losses=["wgan-gp", "r1"], strategies=["fixed", "ttur", "adaptive"],
                      epochs=1000, adaptive_lr=3e-4, **GP_SETUP),
    # ~30 min on 2 CPU cores: MNIST 32×32, a 16-wide Gulrajani model, 9,600 images, 3,000 iterations per strategy
    "cpu-mini": replace(Args(), preset="cpu-mini", dataset="mnist", losses=["wgan-gp"],
                        strategies=["fixed", "adaptive"], num_train=9600, epochs=20, fid_extractor="digits",
                        fid_samples=2000,
                        **{**GP_SETUP, "width": 16, "fid_thresholds": [1000.0, 500.0, 250.0]}),
}


def load_saved_args(run_dir: Path) -> Args:
    try:
        saved = json.loads((run_dir / "args.json").read_text())
        args = Args(**{k: v for k, v in saved.items() if k in {f.name for f in fields(Args)}})
    except (OSError, ValueError, TypeError):
        fail(f"{run_dir}/args.json is missing or unreadable: --resume takes a run folder written by this script (it holds args.json)")
    return replace(args, resume=str(run_dir))


def parse_args(argv: list[str] | None = None) -> Args:
    """--preset (or --resume's saved args.json) becomes tyro's default, so every other flag overrides it
    and --help shows the values that will be used."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="default")
    pre.add_argument("--resume", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.resume is not None:
        default = load_saved_args(Path(known.resume))
    elif known.preset in PRESETS:
        default = PRESETS[known.preset]
    else:
        raise SystemExit(f"error: unknown --preset '{known.preset}': choose one of {', '.join(PRESETS)}")
    return tyro.cli(Args, default=default, args=argv, description=__doc__)


def fail(message: str):
    raise SystemExit(f"error: {message}")


def validate(args: Args) -> None:
    """Every user error as one line naming the flag, before anything is written."""
    for f in fields(Args):
        value = getattr(args, f.name)
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            fail(f"--{f.name.replace('_', '-')} is {value}: give a finite number")
    for name in ("batch_size", "n_critic", "r1_n_critic", "dirac_steps", "epochs", "z_dim", "width", "lr",
                 "fid_samples", "ttur_lr_g", "ttur_lr_d", "clip_value", "dirac_h", "threads", "num_train",
                 "adaptive_lr", "gp_weight", "fid_every"):
        value, zero_ok = getattr(args, name), name in ("threads", "num_train", "adaptive_lr", "gp_weight", "fid_every")
        if value < 0 or (value == 0 and not zero_ok):
            fail(f"--{name.replace('_', '-')} must be {'≥ 0' if zero_ok else 'positive'}, got {value}")
    if not (args.losses and args.strategies and args.lams) or min(args.lams) <= 0:
        fail("--loss, --strategy and --lam need at least one value each, λ > 0 (the paper: 1, 3, 5, 10)")
    if args.dataset == "dirac" and "ttur" in args.strategies:
        fail("the Dirac-GAN compares fixed and adaptive updates: drop ttur from --strategies")
    size = args.image_size
    if args.dataset != "dirac" and any(size < 8 or (size & (size - 1) if loss == "wgan-clip" else size % 8)
                                       for loss in args.losses):
        fail(f"--image-size {size} does not fit: wgan-clip's DCGAN needs a power of two ≥ 8 (64), Gulrajani's model "
             "(wgan-gp, r1) a multiple of 8 (32)")
    if args.fid_extractor == "digits" and args.fid_every and args.dataset not in DIGIT_DATASETS + ("dirac",):
        fail(f"--fid-extractor digits covers {', '.join(DIGIT_DATASETS)}, not {args.dataset}: use inception")
    if args.track and importlib.util.find_spec("wandb") is None:
        fail("pip install wandb, or drop --track")
    if args.resume is not None and not any(Path(args.resume).glob("*/checkpoint.pt")):
        fail(f"{args.resume} has no checkpoint.pt: only runs started with --save-model can be resumed (a Dirac-GAN "
             "run keeps none: it takes seconds, start it again)")


# ---------------------------------------------------------------- the decision rule (Algorithm 1)

def change_ratios(losses: tuple[float, float], previous: tuple | None, eps: float = RATIO_EPS) -> tuple[float, float]:
    """eq. (4) for (L_g, L_d): |L − L_prev| / (|L_prev| + ε); the first iteration sets L_prev = L (Alg. 1, l. 12-13)."""
    return tuple(abs(cur - prev) / (abs(prev) + eps) for cur, prev in zip(losses, previous or losses))


def critic_turn(r_d: float, r_g: float, lam: float, tie_tol: float = TIE_TOL) -> bool:
    """Algorithm 1, line 4: the critic steps if r_d > λ·r_g; a tie (within the relative tolerance) steps G."""
    return r_d > lam * r_g * (1.0 + tie_tol)


def fixed_critic_turn(iteration: int, n_d: int, n_g: int) -> bool:
    """Fixed schedule: n_d critic iterations, then n_g generator iterations, repeated (TTUR: 1:1)."""
    return iteration % (n_d + n_g) < n_d


# ---------------------------------------------------------------- Dirac-GAN (Sec. 3.2): p_data = δ_1, G = δ_θ, D = ψx

def dirac_step(theta: float, psi: float, critic: bool, h: float) -> tuple[float, float]:
    """Ascent / descent of L = ψ − ψθ (eq. 8): critic ψ ← clip(ψ + h(1 − θ), ±0.5) (7), generator θ ← θ + hψ (10)."""
    return (theta, min(DIRAC_CLIP, max(-DIRAC_CLIP, psi + h * (1.0 - theta)))) if critic else (theta + h * psi, psi)


def run_dirac(strategy: str, steps: int, h: float, lam: float = 1.0, n_d: int = 5, tie_tol: float = TIE_TOL) -> dict:
    """One Dirac-GAN trajectory from Fig. 2's start (theta, psi: steps + 1 points; critic_turns) and its statistics."""
    (theta, psi), r_g, r_d, previous = DIRAC_START, 1.0, 1.0, None
    thetas, psis, turns = [theta], [psi], []
    for it in range(steps):
        critic = critic_turn(r_d, r_g, lam, tie_tol) if strategy == "adaptive" else fixed_critic_turn(it, n_d, 1)
        theta, psi = dirac_step(theta, psi, critic, h)
        losses = psi * theta, psi * (1.0 - theta)  # L_g = D(G(z)) = ψθ, L_d = D(1) − D(θ) = ψ(1 − θ), eqs. (3), (8)
        r_g, r_d, previous = *change_ratios(losses, previous), losses
        thetas.append(theta), psis.append(psi), turns.append(critic)
    dist, runs = np.hypot(np.array(thetas) - 1.0, psis), np.split(turns, np.flatnonzero(np.diff(turns)) + 1)
    return {"theta": thetas, "psi": psis, "critic_turns": turns, "final_theta": theta, "final_psi": psi,
            "final_distance": float(dist[-1]), "min_distance_second_half": float(dist[steps // 2:].min()),
            "max_distance_second_half": float(dist[steps // 2:].max()), "u_g": steps - sum(turns), "u_d": sum(turns),
            "switches": len(runs) - 1, "longest_g_run": max([len(r) for r in runs if not r[0]], default=0),
            "longest_d_run": max([len(r) for r in runs if r[0]], default=0)}


def clip_weights(D: nn.Module, c: float) -> None:
    """WGAN's Lipschitz constraint: clamp every critic parameter (batch-norm scale and shift too) to [−c, c]."""
    with torch.no_grad():
        for p in D.parameters():
            p.clamp_(-c, c)


def build_models(loss: str, z_dim: int, width: int, channels: int, image_size: int, seed: int, clip_value: float,
                 device) -> tuple[nn.Sequential, nn.Sequential]:
    """G and D from `seed` alone, so every configuration starts from the same weights. D gives one raw score."""
    torch.manual_seed(seed)
    w, s, act = width, image_size // 8, nn.LeakyReLU(0.2, True)
    if loss != "wgan-clip":  # Gulrajani et al.'s CIFAR-10 model, DIM = width, PyTorch's default init; no BN in D
        G = nn.Sequential(nn.Linear(z_dim, 4 * w * s * s), nn.BatchNorm1d(4 * w * s * s), nn.ReLU(True),
                          nn.Unflatten(1, (4 * w, s, s)), nn.ConvTranspose2d(4 * w, 2 * w, 5, 2, 2, 1),
                          nn.BatchNorm2d(2 * w), nn.ReLU(True), nn.ConvTranspose2d(2 * w, w, 5, 2, 2, 1),
                          nn.BatchNorm2d(w), nn.ReLU(True), nn.ConvTranspose2d(w, channels, 5, 2, 2, 1), nn.Tanh())
        D = nn.Sequential(nn.Conv2d(channels, w, 5, 2, 2), act, nn.Conv2d(w, 2 * w, 5, 2, 2), act,
                          nn.Conv2d(2 * w, 4 * w, 5, 2, 2), act, nn.Flatten(), nn.Linear(4 * w * s * s, 1),
                          nn.Flatten(0))
        return G.to(device), D.to(device)
    # WGAN's DCGAN: 4×4 kernels, no biases, BN in G and in every critic layer but the first, no sigmoid
    c = w * image_size // 8
    g_layers, d_layers = [nn.Unflatten(1, (z_dim, 1, 1)), nn.ConvTranspose2d(z_dim, c, 4, 1, 0, bias=False)], []
    while c > w:  # G doubles the size per block while D (built back to front) halves it
        g_layers += [nn.BatchNorm2d(c), nn.ReLU(True), nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False)]
        d_layers = [nn.Conv2d(c // 2, c, 4, 2, 1, bias=False), nn.BatchNorm2d(c), act] + d_layers
        c //= 2
    G = nn.Sequential(*g_layers, nn.BatchNorm2d(w), nn.ReLU(True), nn.ConvTranspose2d(w, channels, 4, 2, 1, bias=False),
                      nn.Tanh())
    D = nn.Sequential(nn.Conv2d(channels, w, 4, 2, 1, bias=False), act, *d_layers,
                      nn.Conv2d(w * image_size // 8, 1, 4, 1, 0, bias=False), nn.Flatten(0))
    for m in [*G.modules(), *D.modules()]:  # DCGAN init: conv N(0, 0.02), batch-norm scale N(1, 0.02), shift 0
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)):
            nn.init.normal_(m.weight, float(isinstance(m, nn.BatchNorm2d)), 0.02)
        if isinstance(m, nn.BatchNorm2d):
            nn.init.zeros_(m.bias)
    clip_weights(D, clip_value)  # clipped from the start: G never trains against an unclipped critic
    return G.to(device), D.to(device)


def gradient_penalty(D: nn.Module, real, fake, alpha, create_graph: bool = True) -> torch.Tensor:
    """Gulrajani et al.: mean over samples of (‖∇_x̂ D(x̂)‖₂ − 1)², x̂ = α·x + (1 − α)·G(z), α ~ U[0, 1] per sample."""
    x_hat = (alpha * real + (1 - alpha) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(D(x_hat).sum(), x_hat, create_graph=create_graph)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def generator_loss(fake_score: torch.Tensor, loss: str) -> torch.Tensor:
    """L_g as G minimises it: −D(G(z)) (Table 1 up to sign); r1: the non-saturating softplus(−D(G(z)))."""
    return F.softplus(-fake_score).mean() if loss == "r1" else -fake_score.mean()


def gan_losses(D: nn.Module, real, fake, alpha, loss: str, gp_weight: float, create_graph: bool = True):
    """[L_g, L_d, penalty] on one batch, L_d as the critic minimises it, penalty included (Table 1)."""
    if loss == "r1":  # softplus(−D(x)) + softplus(D(G(z))) + γ/2·E‖∇_x D(x)‖² (R1: Mescheder et al. 2018, eq. 9)
        real = real.detach().requires_grad_(True)
        real_score, fake_score = getattr(D, "_orig_mod", D)(real), D(fake)  # ∇_x D(x): uncompiled D (double backward)
        grad = torch.autograd.grad(real_score.sum(), real, create_graph=create_graph)[0]
        penalty = grad.flatten(1).pow(2).sum(1).mean()
        critic = F.softplus(-real_score).mean() + F.softplus(fake_score).mean() + gp_weight / 2 * penalty
    else:  # D(G(z)) − D(x) (+ λ_GP·GP for WGAN-GP)
        real_score, fake_score = D(real), D(fake)
        penalty = gradient_penalty(getattr(D, "_orig_mod", D), real, fake, alpha, create_graph) if loss == "wgan-gp" else real.new_zeros(())
        critic = fake_score.mean() - real_score.mean() + gp_weight * penalty
    return torch.stack([generator_loss(fake_score, loss), critic, penalty])


def evaluate_losses(G, D, real, z, alpha, loss: str, gp_weight: float, fake=None) -> torch.Tensor:
    """[L_g, L_d, penalty] with the CURRENT weights, no parameter gradients (fake = G(z) when G is unchanged)."""
    with torch.no_grad():
        fake = G(z) if fake is None else fake
    with torch.no_grad() if loss == "wgan-clip" else torch.enable_grad():  # penalties need ∇_x D
        return gan_losses(D, real, fake, alpha, loss, gp_weight, create_graph=False).detach()


Config = NamedTuple("Config", [("name", str), ("loss", str), ("strategy", str), ("lam", "float | None"),
                               ("n_d", "int | None"), ("lr_g", "float | None"), ("lr_d", "float | None")])


def configurations(args: Args) -> list[Config]:
    """losses × strategies (× λ), with schedules and learning rates; the Dirac-GAN always has Fig. 2(a)'s fixed run."""
    if args.dataset == "dirac":
        return [Config(f"fixed_{args.n_critic}-1", "wgan-clip", "fixed", None, args.n_critic, None, None)] + [
            Config(f"adaptive_lam{lam:g}", "wgan-clip", "adaptive", lam, None, None, None)
            for lam in args.lams if "adaptive" in args.strategies]
    out, lr, wanted = [], args.adaptive_lr or args.lr, set(args.strategies)
    for loss in args.losses:
        n_d = args.r1_n_critic if loss == "r1" else args.n_critic
        out += [Config(f"{loss}_fixed_{n_d}-1", loss, "fixed", None, n_d, args.lr, args.lr)] * ("fixed" in wanted)
        out += [Config(f"{loss}_ttur", loss, "ttur", None, 1, args.ttur_lr_g, args.ttur_lr_d)] * ("ttur" in wanted)
        out += [Config(f"{loss}_adaptive_lam{lam:g}", loss, "adaptive", lam, None, lr, lr)
                for lam in dict.fromkeys(args.lams) if "adaptive" in wanted]
    return out


def save_checkpoint(path: Path, G, D, opt_g, opt_d, batches: Batches, noise_gen: torch.Generator, counters) -> None:
    """Everything the loop needs to go on bit-identically; written to a temporary file, then renamed."""
    torch.save({"G": G.state_dict(), "D": D.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                "batches": batches.state_dict(), "noise_gen": noise_gen.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "counters": counters}, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def train(args: Args, cfg: Config, images: torch.Tensor, fid: FID | None, run_dir: Path, device: torch.device,
          stop: threading.Event, header: dict) -> dict:
    """Train one configuration into run_dir (and go on from its checkpoint.pt with --resume); returns its results."""
    from torch.utils.tensorboard import SummaryWriter
    from torchvision.utils import make_grid, save_image
    G, D = build_models(cfg.loss, args.z_dim, args.width, images.shape[1], args.image_size, args.seed,
                        args.clip_value, device)
    # WGAN-GP: Adam betas (0.5, 0.9) (Sec. 4.1); WGAN and r1: RMSprop (PyTorch's defaults), as the WGAN code and R1's
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr, betas=(0.5, 0.9), fused=device.type == "cuda")
                    if cfg.loss == "wgan-gp" else torch.optim.RMSprop(m.parameters(), lr)
                    for m, lr in ((G, cfg.lr_g), (D, cfg.lr_d)))
    torch._dynamo.reset()  # --compile: each configuration compiles afresh (new networks would pile up recompilations)
    fast_G, fast_D = (torch.compile(m) if args.compile else m for m in (G, D))  # the loop's G and D; metrics: eager G
    noise_gen = torch.Generator(device).manual_seed(args.seed + 1)
    batches = Batches(images, batch_size=args.batch_size, generator=torch.Generator(device).manual_seed(args.seed))
    total = args.epochs * (per_epoch := math.ceil(len(images) / args.batch_size))  # Table 2: u_g + u_d = epochs × ⌈N / 64⌉
    sample_noise = torch.randn(64, args.z_dim, generator=torch.Generator().manual_seed(args.seed + 2)).to(device)
    fid_noise = torch.randn(args.fid_samples, args.z_dim, generator=torch.Generator().manual_seed(args.seed + 3))
    it, u_g, u_d, r_g, r_d, previous, history, reason = 0, 0, 0, 1.0, 1.0, None, [], ""  # Alg. 1: ratios start at 1
    checkpoint = run_dir / "checkpoint.pt"
    if args.resume is not None and checkpoint.exists():
        try:
            ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)  # load_state_dict moves tensors
        except Exception as e:
            fail(f"{checkpoint} cannot be read ({type(e).__name__}): delete that folder to restart the configuration")
        for obj, key in ((G, "G"), (D, "D"), (opt_g, "opt_g"), (opt_d, "opt_d"), (batches, "batches")):
            obj.load_state_dict(ckpt[key])
        noise_gen.set_state(ckpt["noise_gen"]), torch.set_rng_state(ckpt["torch_rng"])
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"]) if ckpt["cuda_rng"] and torch.cuda.is_available() else None
        it, u_g, u_d, r_g, r_d, previous, history = ckpt["counters"]
    writer = SummaryWriter(str(run_dir), purge_step=it or None)
    if it == 0:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
            f"|{k}|{v}|" for k, v in {**asdict(args), **cfg._asdict()}.items()))
    window_d, last_it, last_time = 0, it, time.perf_counter()
    bar = tqdm(total=total, initial=it, desc=cfg.name, mininterval=1.0, disable=not sys.stdout.isatty())
    while it < total and not stop.is_set():  # stop = Ctrl-C or SIGTERM, seen only between whole iterations
        (x,) = batches.next()
        real = to_float(x)  # the data stays uint8 on the device; one batch at a time becomes float
        z = torch.randn(args.batch_size, args.z_dim, device=device, generator=noise_gen)
        alpha = torch.rand(args.batch_size, 1, 1, 1, device=device, generator=noise_gen)
        # Algorithm 1, line 4: the critic steps if r_d > λ·r_g, otherwise the generator; baselines cycle n_d:1
        critic = critic_turn(r_d, r_g, cfg.lam) if cfg.strategy == "adaptive" else fixed_critic_turn(it, cfg.n_d, 1)
        if critic:  # Alg. 1 lines 5-8: one critic step on L_d, then clipping (wgan-clip)
            with torch.no_grad():
                fake = fast_G(z)  # still G(z) after the step: G does not change
            opt_d.zero_grad(set_to_none=True)
            gan_losses(fast_D, real, fake, alpha, cfg.loss, args.gp_weight)[1].backward()
            opt_d.step()
            if cfg.loss == "wgan-clip":
                clip_weights(D, args.clip_value)
        else:  # Alg. 1 lines 9-10: one generator step on L_g (gradients for G's parameters only)
            fake = None
            opt_g.zero_grad(set_to_none=True)
            generator_loss(fast_D(fast_G(z)), cfg.loss).backward(inputs=list(G.parameters()))
            opt_g.step()
        it, u_d, u_g, window_d = it + 1, u_d + critic, u_g + (not critic), window_d + critic
        if cfg.strategy == "adaptive" or it % LOG_EVERY == 0:
            # both losses with the new weights on this batch (x, z, α); adaptive: on the host each iteration (one sync)
            values = evaluate_losses(fast_G, fast_D, real, z, alpha, cfg.loss, args.gp_weight, fake).tolist()
            if not all(map(math.isfinite, values)):
                reason = f": non-finite loss at iteration {it}"
                break
        if cfg.strategy == "adaptive":  # Alg. 1 lines 12-18: eq. (4) against the previous iteration's losses
            r_g, r_d, previous = *change_ratios(values[:2], previous), tuple(values[:2])
        if it % LOG_EVERY == 0:
            scalars = {"losses/g_loss": values[0], "losses/d_loss": values[1], "losses/gradient_penalty": values[2],
                       "charts/u_g": u_g, "charts/u_d": u_d, "charts/critic_step_fraction": window_d / LOG_EVERY,
                       "charts/SPS": (it - last_it) / (time.perf_counter() - last_time)}
            for tag, value in {**scalars, **({"charts/r_g": r_g, "charts/r_d": r_d} if cfg.lam else {})}.items():
                writer.add_scalar(tag, value, it)
            window_d, last_it, last_time = 0, it, time.perf_counter()
        bar.update(1)
        if it % per_epoch == 0 or it == total:  # epoch end: metrics, samples, checkpoint
            epoch, metrics = math.ceil(it / per_epoch), None
            if fid is not None and (epoch % args.fid_every == 0 or it == total):
                metrics = fid.evaluate_generator(G, fid_noise.to(device), batch_size=256)  # full precision inside
                for tag, key in METRIC_TAGS.items():
                    writer.add_scalar(f"eval/{tag}", metrics[key], it) if key in metrics else None
                bar.write(f"{cfg.name} epoch {epoch}: FID {metrics['fid']:.2f}, u_g {u_g}, u_d {u_d}")
            history.append({"epoch": epoch, "iteration": it, "u_g": u_g, "u_d": u_d, "metrics": metrics})
            if epoch % SAMPLE_EVERY == 0 or it == total:  # fixed-noise samples, G in eval mode as for FID
                with torch.no_grad():
                    grid = make_grid(G.eval()(sample_noise).cpu(), nrow=8, normalize=True, value_range=(-1, 1))
                save_image(grid, run_dir / f"samples_epoch{epoch:04d}.png"), writer.add_image("samples", grid, it)
                G.train()
            if args.save_model:
                save_checkpoint(checkpoint, G, D, opt_g, opt_d, batches, noise_gen,
                                (it, u_g, u_d, r_g, r_d, previous, history))
    bar.close()
    status = "diverged" if reason else "interrupted" if it < total else "finished"
    if status == "interrupted" and args.save_model:  # Ctrl-C: the state after the last whole iteration
        save_checkpoint(checkpoint, G, D, opt_g, opt_d, batches, noise_gen, (it, u_g, u_d, r_g, r_d, previous, history))
    writer.close()
    return write_results(run_dir, {**header, "status": status, "config": cfg.name, **cfg._asdict(), "reason": reason,
                                   "iterations": it, "budget_iterations": total, "iterations_per_epoch": per_epoch,
                                   "u_g": u_g, "u_d": u_d, "history": history})


# ---------------------------------------------------------------- tables and figures from results.json

def model_name(r: dict) -> tuple[str, str]:
    """(Model, Parameters) cells in the paper's wording, with the learning rates used."""
    lrs = "" if r["lr_g"] is None else f"; lr {r['lr_g']:g}" + f"/{r['lr_d']:g} (G/D)" * (r["lr_g"] != r["lr_d"])
    base = "Dirac-GAN" if r["args"]["dataset"] == "dirac" else PAPER_NAMES[r["loss"]]
    if r["strategy"] == "adaptive":
        return f"adaptive {base}", f"λ = {r['lam']:g}{lrs}"
    return f"{base} TTUR" if r["strategy"] == "ttur" else base, f"n_d = {r['n_d']}, n_g = 1{lrs}"


def number(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summarize(results: list[dict]) -> str:
    """The paper's table (Tables 2-4; Dirac-GAN: trajectory statistics) from configurations' results.json dicts alone,
    rows in the paper's order whatever order they come in, so runs made elsewhere give the same table."""
    rows = sorted(results, key=lambda r: (list(PAPER_NAMES).index(r["loss"]), ["fixed", "ttur", "adaptive"].index(
        r["strategy"]), r["lam"] or 0.0, r["n_d"] or 0))
    a, cells = rows[0]["args"], []
    if a["dataset"] == "dirac":
        head = ["final_theta", "final_psi", "final_distance", "min_distance_second_half", "max_distance_second_half",
                "u_g", "u_d", "switches", "longest_g_run", "longest_d_run"]
        title = f"# Dirac-GAN, h = {a['dirac_h']:g}, {a['dirac_steps']} iterations from {DIRAC_START}"
        cells = [[number(r[k], 4) if isinstance(r[k], float) else str(r[k]) for k in head] for r in rows]
    else:
        scored = [h["metrics"] for r in rows for h in r["history"] if h["metrics"]] + [{}]
        title = (f"# {a['dataset']} {a['image_size']}×{a['image_size']}, {rows[0]['budget_iterations']} loop iterations"
                 f" each; metrics: {scored[0].get('extractor', 'off')}, {scored[0].get('num_fake')} samples")
        head = [*(f"FID ≤ {t:g} (epoch)" for t in a["fid_thresholds"]), "best epoch", "IS", "FID", "KID", "u_g", "u_d",
                "total u_g", "total u_d", "status"]
        for r in rows:
            evaluated = [h for h in r["history"] if h["metrics"]]
            best = min(evaluated, key=lambda h: h["metrics"]["fid"]) if evaluated else {"metrics": {}}
            m = best["metrics"]
            cells.append([next((str(h["epoch"]) for h in evaluated if h["metrics"]["fid"] <= t), "*")
                          for t in a["fid_thresholds"]] + [str(best.get("epoch", "-")), number(m.get("is_mean")),
                         number(m.get("fid")), number(m.get("kid_mean"), 4), str(best.get("u_g", "-")),
                         str(best.get("u_d", "-")), str(r["u_g"]), str(r["u_d"]), r["status"] + r["reason"]])
    lines = [title, "", "| Model | Parameters | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    lines += ["| " + " | ".join([*model_name(r), *c]) + " |" for r, c in zip(rows, cells)]
    return "\n".join(dict.fromkeys(lines)) + "\n"  # the same configuration counted twice shows once


def write_results(folder: Path, result: dict, results: list[dict] | None = None) -> dict:
    """results.json (via a temporary file) and results.md (its first line names a status other than finished)."""
    (folder / "results.tmp").write_text(json.dumps(result, indent=2))
    os.replace(folder / "results.tmp", folder / "results.json")
    (folder / "results.md").write_text(("" if result["status"] == "finished" else f"**status: {result['status']}**\n\n")
                                       + (summarize(results or [result]) if results != [] else "nothing ran\n"))
    return result


def plot_dirac(results: list[dict], path: Path) -> None:
    """Fig. 2: the trajectories of all configurations in the (θ, ψ) plane, the clipped region shaded."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.axhspan(DIRAC_CLIP, 10, color="grey", alpha=0.2), ax.axhspan(-10, -DIRAC_CLIP, color="grey", alpha=0.2)
    for r in results:
        theta, psi, label = np.array(r["theta"]), np.array(r["psi"]), " ".join(model_name(r))
        ax.plot(theta, psi, lw=0.6, label=f"{label}: u_g {r['u_g']}, u_d {r['u_d']}, end {r['final_distance']:.3f}")
        ax.plot(theta[-1], psi[-1], "o", mfc="none", color="red", ms=9)
    ax.plot(*DIRAC_START, "o", color="red"), ax.plot(1, 0, "k+", ms=10), ax.set_xlabel("θ"), ax.set_ylabel("ψ")
    ax.set_xlim(0, 2.5), ax.set_ylim(-1, 1), ax.legend(fontsize=7, loc="lower left")
    ax.set_title(f"Dirac-GAN, h = {results[0]['args']['dirac_h']:g}, {results[0]['args']['dirac_steps']} iterations; "
                 "equilibrium +, start ●, end ○", fontsize=9)
    fig.tight_layout(), fig.savefig(path, dpi=100), plt.close(fig)


def main() -> None:
    args = parse_args()
    validate(args)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads) if args.threads > 0 else None
    torch.set_float32_matmul_precision({"auto": "high" if device.type == "cuda" else "highest"}.get(args.matmul_precision, args.matmul_precision))
    torch.backends.cudnn.allow_tf32 = torch.get_float32_matmul_precision() != "highest"
    images = fid = None
    if args.dataset != "dirac":  # data and the real metric features before the run folder: a failure leaves none
        data = load_dataset(args.dataset, "train", image_size=args.image_size, root=args.data_root,
                            num_samples=args.num_train or None)
        if len(data) < args.batch_size:
            fail(f"{len(data)} training images are fewer than one batch: lower --batch-size or raise --num-train")
        if args.fid_every and args.fid_samples > len(data):
            fail(f"--fid-samples {args.fid_samples} is more than the {len(data)} training images: lower --fid-samples")
        if args.fid_every:
            fid = FID(data.x, extractor=args.fid_extractor, num_samples=args.fid_samples, root=args.data_root,
                      inception_weights=args.inception_weights, device=device, dataset=args.dataset)
        images = data.x.to(device)  # uint8 on the device
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    run_name = args.run_name or f"{args.dataset}__{Path(__file__).stem}__{args.seed}__{stamp}"
    run_dir = Path(args.resume) if args.resume is not None else Path(args.output_dir) / run_name
    if args.resume is None and run_dir.exists() and any(run_dir.iterdir()):
        fail(f"{run_dir} already exists: choose another --run-name, or continue it with --resume {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "args.json").write_text(json.dumps(asdict(args), indent=2))
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, name=run_dir.name, config=asdict(args), sync_tensorboard=True,
                   dir=str(run_dir), resume="allow", id=run_dir.name)
    header = {"script": Path(__file__).name, "run_name": run_dir.name, "device": str(device), "args": asdict(args)}
    configs, results = configurations(args), []
    stop = threading.Event()  # set by Ctrl-C/SIGTERM; the loop stops at the next step boundary
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    for cfg in configs:  # one configuration per call, each into its own folder
        if stop.is_set():
            break
        (run_dir / cfg.name).mkdir(parents=True, exist_ok=True)
        if args.dataset == "dirac":
            trajectory = run_dirac(cfg.strategy, args.dirac_steps, args.dirac_h, cfg.lam, cfg.n_d)
            results.append(write_results(run_dir / cfg.name, {**header, "status": "finished", "config": cfg.name,
                                                              **cfg._asdict(), "reason": "", **trajectory}))
        else:
            results.append(train(args, cfg, images, fid, run_dir / cfg.name, device, stop, header))
    statuses = [r["status"] for r in results]
    status = ("interrupted" if "interrupted" in statuses or len(results) < len(configs)
              else "diverged" if all(s == "diverged" for s in statuses) else "finished")
    write_results(run_dir, {**header, "status": status, "configs": [r["config"] for r in results]}, results)
    if args.dataset == "dirac" and results:
        plot_dirac(results, run_dir / "dirac_phase_plane.png")
    if status == "interrupted":
        kept = "checkpoint and results" if args.save_model else "results (no checkpoint: run without --save-model)"
        print(f"interrupted: {kept} so far in {run_dir}; continue: python {Path(__file__).name} --resume {run_dir}")
        sys.exit(130)
    print(f"every configuration diverged: see {run_dir}/results.md" if status == "diverged"
          else (run_dir / "results.md").read_text() + f"\nwritten to {run_dir}")
    sys.exit(3 if status == "diverged" else 0)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C before the handlers were installed: nothing was trained yet
        print("interrupted before training began; nothing to resume", file=sys.stderr)
        sys.exit(130)
