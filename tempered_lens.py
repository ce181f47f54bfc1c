"""Tempered Adversarial Networks: a lens between the real data and the discriminator.

Paper: M. S. M. Sajjadi, G. Parascandolo, A. Mehrjou, B. Schölkopf, "Tempered Adversarial Networks",
ICML 2018, https://arxiv.org/abs/1802.04374

D never sees the real images X: it sees L(X), the output of a residual fully-convolutional lens trained once
per generator iteration with L_L = λ·L_A + L_R (eq. 3). L_A works against D (it pushes L(X) towards what D
calls fake, eqs. 8/11/14), L_R = ‖X − L(X)‖² (eq. 2) keeps it near the data, and λ falls from 1 to 0 over K
iterations (eq. 4), after which training is the plain GAN. Each seed runs with and without the lens from the
same G, D, batches, noise and penalty draws, one configuration per sub-folder.

    python tempered_lens.py                                  # DCGAN on MNIST, 3 seeds with and without the lens
    python tempered_lens.py --preset stacked-mnist-nsgan     # Color MNIST: FID, modes covered, KL (Figs. 6, 9)
    python tempered_lens.py --preset cifar10-wgan-gp --inception-weights inception-2015-12-05-fid.pth
    python tempered_lens.py --preset cpu-mini                # MNIST at CPU scale, digit-CNN FID
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
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common.datasets import Batches, load_dataset, to_float
from common.fid import FID, full_precision, load_digit_classifier


@dataclass
class Args:
    # experiment
    preset: Literal["default", "stacked-mnist-nsgan", "mnist-lsgan", "stacked-mnist-lsgan", "celeba-lsgan",
                    "cifar10-wgan-gp", "fixed-lambda", "cpu-mini"] = "default"
    """paper experiment to start from; every other flag overrides it: default (DCGAN on MNIST, Sec. 4.1.1),
    stacked-mnist-nsgan (4.1.2), mnist-lsgan (4.2.1), stacked-mnist-lsgan (4.2.2), celeba-lsgan (4.2.3),
    cifar10-wgan-gp (4.3.1: RMSProp, z 128, C 128, 5 critic steps, 10k FID samples), fixed-lambda (Fig. 5 top),
    cpu-mini (MNIST on a CPU)"""
    seed: int = 1
    """first seed; runs use seed, seed+1, ... (initial weights, batch order, noise and penalty draws follow it)"""
    num_seeds: int = 3
    """seeds per configuration (the paper: at least 3)"""
    cuda: bool = True
    """use CUDA when available"""
    threads: int = 0
    """torch CPU threads (0 = torch's default)"""
    matmul_precision: Literal["auto", "highest", "high", "medium"] = "auto"
    """training matmuls: highest = full float32; high = TF32 on CUDA (float32 elsewhere); medium = bf16-backed
    float32 on capable CPUs/GPUs (about 2× on a recent CPU); auto = high on CUDA, highest on CPU. Metrics: always full"""
    compile: bool = False
    """torch.compile G, D and the lens (inductor); WGAN-GP's penalty runs through the uncompiled D (double backward)"""
    track: bool = False
    """log to Weights & Biases (TensorBoard synced; respects WANDB_MODE=offline)"""
    wandb_project_name: str = "gan-stability"
    """W&B project for --track"""
    output_dir: str = "runs"
    """folder that receives {output_dir}/{run_name}/"""
    run_name: str | None = None
    """run folder name (default {dataset}__tempered_lens__{seed}__{date-time}-{random})"""
    save_model: bool = False
    """checkpoint models, optimisers, data order and RNGs at every evaluation, at the end and on Ctrl-C"""
    resume: str | None = None
    """continue the run in this folder with its saved args.json; flags given as well override them"""
    # data
    dataset: Literal["mnist", "stacked-mnist", "cifar10", "celeba", "fake"] = "mnist"
    """training data, always at 32×32 (stacked-mnist: Color MNIST, 1,000 modes; fake: synthetic, for tests)"""
    data_root: str = "data"
    """root folder of the datasets (and of cached FID statistics / digit classifiers)"""
    # method
    gan: Literal["nsgan", "lsgan", "wgan-gp"] = "nsgan"
    """DCGAN with batch norm (2.1), LSGAN without (2.2), WGAN-GP (2.3; start from its preset for its settings)"""
    lens: Literal["both", "with", "without"] = "both"
    """train every seed with and without the lens (the paper's comparison), or only one of the two"""
    lens_k: int = 10_000
    """K of eq. (4): λ falls from 1 to 0 over K generator iterations (10^4 in Figs. 2 and 7; the text says 10^5)"""
    lam_schedule: Literal["sine", "fixed"] = "sine"
    """sine: λ = 1 − sin(tπ/2K) (eq. 4); fixed: λ = 1 throughout (Fig. 5 top)"""
    reconstruction: Literal["mean", "sum"] = "mean"
    """L_R = ‖X − L(X)‖² as a mean over pixels, or summed over each image's pixels (eq. 2 read literally;
    multiplies L_R by C·H·W = 1,024 or 3,072, i.e. divides the effective λ by that)"""
    lens_init: Literal["xavier", "identity"] = "xavier"
    """xavier: every layer Xavier (Sec. 2.4; L(X) starts far from X); identity: last conv zero, so L(X) = X at t = 0"""
    lens_width: int = 64
    """feature channels of the lens"""
    lens_blocks: int = 8
    """residual blocks of the lens (Fig. 4: 8)"""
    width: int = 64
    """C of Fig. 3: channels of the first D layer / last G layer (Gulrajani's WGAN-GP: 128)"""
    z_dim: int = 100
    """latent size of G (DCGAN 100, Gulrajani's WGAN-GP 128)"""
    n_critic: int = 1
    """D (critic) steps per generator iteration (Gulrajani's WGAN-GP: 5); the lens steps once per iteration"""
    gp_weight: float = 10.0
    """gradient-penalty weight (wgan-gp only)"""
    # training
    total_steps: int = 100_000
    """generator iterations"""
    batch_size: int = 64
    """batch size (Sec. 2.4: 32 and 64)"""
    lr: float = 1e-4
    """learning rate of G, D and the lens (Sec. 2.4)"""
    optimizer: Literal["adam", "rmsprop"] = "adam"
    """adam: β = (0.5, 0.999), or (0.5, 0.9) for wgan-gp as Gulrajani; rmsprop: the paper's WGAN-GP (Sec. 2.4)"""
    # evaluation
    fid_extractor: Literal["inception", "digits"] = "inception"
    """FID features: Inception (standard) or the in-domain digit CNN (mnist / stacked-mnist / fake)"""
    fid_samples: int = 4_096
    """samples for FID (Sec. 2.4: 4,096 for DCGAN/LSGAN, 10,000 for WGAN-GP)"""
    inception_weights: str | None = None
    """local Inception FID weights (inception-2015-12-05-fid.pth) where there is no network"""
    mode_samples: int = 26_000
    """Stacked MNIST: samples for modes covered and KL (26,000, the VEEGAN/PacGAN protocol)"""
    eval_every: int = 5_000
    """generator iterations between evaluations, sample grids and checkpoints (also at the end)"""
    log_every: int = 100
    """generator iterations between scalar logs and the non-finite loss check"""


PRESETS: dict[str, Args] = {
    "default": Args(),  # Sec. 4.1.1: DCGAN on MNIST, FID 22 with the lens vs 42 without
    "stacked-mnist-nsgan": replace(Args(), preset="stacked-mnist-nsgan", dataset="stacked-mnist"),  # Sec. 4.1.2, Fig. 6
    "mnist-lsgan": replace(Args(), preset="mnist-lsgan", gan="lsgan"),  # Sec. 4.2.1
    "stacked-mnist-lsgan": replace(Args(), preset="stacked-mnist-lsgan", gan="lsgan", dataset="stacked-mnist"),
    "celeba-lsgan": replace(Args(), preset="celeba-lsgan", gan="lsgan", dataset="celeba"),  # Sec. 4.2.3, Fig. 10
    # Sec. 4.3.1, Fig. 7: Gulrajani's CIFAR model (z 128, C 128, 5 critic steps, λ_GP 10) with RMSProp, 10k FID
    "cifar10-wgan-gp": replace(Args(), preset="cifar10-wgan-gp", gan="wgan-gp", dataset="cifar10", optimizer="rmsprop",
                               z_dim=128, width=128, n_critic=5, fid_samples=10_000),
    "fixed-lambda": replace(Args(), preset="fixed-lambda", lens="with", lam_schedule="fixed"),  # Fig. 5
    # MNIST at CPU scale (~40 min on 2 cores): narrow nets, batch 32, λ reaches 0 at a quarter of the run
    "cpu-mini": replace(Args(), preset="cpu-mini", width=32, lens_width=8, batch_size=32, total_steps=2_000,
                        lens_k=500, fid_extractor="digits", eval_every=250, log_every=50),
}


def load_saved_args(run_dir: Path) -> Args:
    try:
        saved = json.loads((run_dir / "args.json").read_text())
        args = Args(**{k: v for k, v in saved.items() if k in {f.name for f in fields(Args)}})
    except (OSError, ValueError, TypeError, AttributeError):
        raise SystemExit(f"error: cannot read {run_dir / 'args.json'}: --resume takes a run folder written by "
                         "this script (it holds args.json)") from None
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


def validate(args: Args) -> None:
    """Every user error as one line naming the fix, before anything is written."""
    for f in fields(Args):
        value, flag = getattr(args, f.name), "--" + f.name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise SystemExit(f"error: {flag} is {value}: give a finite number")
        if f.name in ("gp_weight", "threads") and value < 0:
            raise SystemExit(f"error: {flag} is {value}: give a number ≥ 0")
        if f.name in ("num_seeds", "lens_k", "lens_width", "lens_blocks", "width", "z_dim", "n_critic", "lr",
                      "total_steps", "batch_size", "fid_samples", "mode_samples", "eval_every", "log_every") and value <= 0:
            raise SystemExit(f"error: {flag} is {value}: give a positive number")
    if args.fid_extractor == "digits" and args.dataset not in ("mnist", "stacked-mnist", "fake"):
        raise SystemExit(f"error: the digit CNN does not cover {args.dataset}: use --fid-extractor inception")
    if args.inception_weights is not None and not Path(args.inception_weights).is_file():
        raise SystemExit(f"error: {args.inception_weights} does not exist: pass the Inception FID weights file "
                         "to --inception-weights, or drop the flag to download them")
    if args.resume is not None and not any(Path(args.resume).glob("*/checkpoint.pt")):
        raise SystemExit(f"error: {args.resume} has no checkpoint.pt: only runs started with --save-model can be resumed")
    if args.track and importlib.util.find_spec("wandb") is None:
        raise SystemExit("error: --track needs wandb: pip install wandb, or drop --track")


def xavier_init(module: nn.Module) -> nn.Module:
    """Xavier (Glorot) weights and zero biases for every conv / linear layer (Sec. 2.4)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def generator(z_dim: int, width: int, channels: int, batch_norm: bool, kernel: int = 4) -> nn.Sequential:
    """Fig. 3 (top): z → 4×4×4C → 8×8×2C → 16×16×C → 32×32, ReLU, tanh output; kernel 4 (DCGAN) or 5
    (Gulrajani's CIFAR model), stride-2 up-sampling."""
    pad, out_pad = (1, 0) if kernel == 4 else (2, 1)
    layers = [nn.Linear(z_dim, 64 * width), nn.BatchNorm1d(64 * width) if batch_norm else nn.Identity(), nn.ReLU(),
              nn.Unflatten(1, (4 * width, 4, 4))]
    for c_in, c_out in ((4 * width, 2 * width), (2 * width, width)):
        layers += [nn.ConvTranspose2d(c_in, c_out, kernel, 2, pad, out_pad),
                   nn.BatchNorm2d(c_out) if batch_norm else nn.Identity(), nn.ReLU()]
    return nn.Sequential(*layers, nn.ConvTranspose2d(width, channels, kernel, 2, pad, out_pad), nn.Tanh())


def discriminator(width: int, channels: int, batch_norm: bool, kernel: int = 4) -> nn.Sequential:
    """Fig. 3 (bottom): 32×32 → 16×16×C → 8×8×2C → 4×4×4C → one raw score per image (the losses apply the
    sigmoid). Leaky ReLU 0.2; batch norm (nsgan only) on all but the first layer, as in DCGAN."""
    pad = 1 if kernel == 4 else 2
    layers = [nn.Conv2d(channels, width, kernel, 2, pad), nn.LeakyReLU(0.2)]
    for c_in, c_out in ((width, 2 * width), (2 * width, 4 * width)):
        layers += [nn.Conv2d(c_in, c_out, kernel, 2, pad), nn.BatchNorm2d(c_out) if batch_norm else nn.Identity(),
                   nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * width, 1), nn.Flatten(0))


class Lens(nn.Module):
    """Fig. 4: 3×3 stride-1 convolutions, `blocks` residual blocks (conv–ReLU–conv + skip) and a global skip,
    L(x) = x + net(x), so that the identity is easy to reach. No normalisation, no output activation."""

    def __init__(self, channels: int, width: int = 64, blocks: int = 8):
        super().__init__()
        self.head = nn.Conv2d(channels, width, 3, 1, 1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(width, width, 3, 1, 1), nn.ReLU(),
                                                  nn.Conv2d(width, width, 3, 1, 1)) for _ in range(blocks))
        self.tail = nn.Conv2d(width, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        for block in self.blocks:
            h = h + block(h)
        return x + self.tail(F.relu(h))


def build_models(args: Args, channels: int, seed: int, use_lens: bool, device) -> tuple[nn.Module, nn.Module, nn.Module | None]:
    """G and D from `seed`, then the lens from its own seed: the same G and D with and without the lens (Sec. 4)."""
    batch_norm, kernel = {"nsgan": (True, 4), "lsgan": (False, 4), "wgan-gp": (None, 5)}[args.gan]
    torch.manual_seed(seed)
    G = xavier_init(generator(args.z_dim, args.width, channels, batch_norm is not False, kernel))  # WGAN-GP: BN in G
    D = xavier_init(discriminator(args.width, channels, batch_norm is True, kernel))
    lens = None
    if use_lens:
        torch.manual_seed(seed + 1_000_003)
        lens = xavier_init(Lens(channels, args.lens_width, args.lens_blocks)).to(device)
        if args.lens_init == "identity":  # net(x) = 0 at t = 0: L(X) = X exactly, and the tail still learns
            nn.init.zeros_(lens.tail.weight)
    return G.to(device), D.to(device), lens


def make_optimizer(module: nn.Module, args: Args, device) -> torch.optim.Optimizer:
    if args.optimizer == "rmsprop":  # TensorFlow's RMSProp defaults (decay 0.9, ε 1e-10): the paper's code is TF
        return torch.optim.RMSprop(module.parameters(), lr=args.lr, alpha=0.9, eps=1e-10)
    betas = (0.5, 0.9) if args.gan == "wgan-gp" else (0.5, 0.999)
    return torch.optim.Adam(module.parameters(), lr=args.lr, betas=betas, fused=device.type == "cuda" or None)


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


def discriminator_loss(gan: str, real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """D's loss with L(X) as "real": eq. (7) −log D(L(X)) − log(1 − D(G(Z))), eq. (10) D(G(Z))² + (D(L(X)) − 1)²,
    eq. (13) D(G(Z)) − D(L(X)). Its "real" half is G's loss on L(X), its "fake" half the lens's L_A on G(Z)."""
    return generator_loss(gan, real_scores) + lens_adversarial_loss(gan, fake_scores)


def reconstruction_loss(real: torch.Tensor, lensed: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """L_R = ‖X − L(X)‖², eq. (2): mean over all elements, or summed over each image and averaged over the batch."""
    return (real - lensed).pow(2).mean() if reduction == "mean" else (real - lensed).pow(2).flatten(1).sum(1).mean()


def lens_weight(step: int, k: int, fixed: float | None = None) -> float:
    """λ of eq. (4): 1 − sin(tπ/2K) for t ≤ K, 0 after (t: generator iterations from 0); or `fixed`."""
    return fixed if fixed is not None else 1.0 - math.sin(step * math.pi / (2 * k)) if step <= k else 0.0


def gradient_penalty(D: nn.Module, real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """WGAN-GP: (‖∇D(x̂)‖ − 1)² at x̂ = εr + (1 − ε)f; with a lens, r = L(X) (what D calls real)."""
    mixed = (eps * real + (1 - eps) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(D(mixed).sum(), mixed, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def discriminator_step(D, G, lens, d_opt, real, z, gan: str, gp_weight: float, eps_gen: torch.Generator) -> dict:
    """One D update on {L(X), G(Z)} instead of {X, G(Z)} (eqs. 7/10/13); it never changes the lens or G."""
    with torch.no_grad():
        real_view = real if lens is None else lens(real)  # D sees L(X) in place of X
        fake = G(z)
    real_scores, fake_scores = D(real_view), D(fake)
    loss = discriminator_loss(gan, real_scores, fake_scores)
    penalty = torch.zeros((), device=real.device)
    if gan == "wgan-gp":  # ε from its own stream: the same draws with and without the lens
        eps = torch.rand(len(real), 1, 1, 1, device=real.device, generator=eps_gen)
        penalty = gradient_penalty(getattr(D, "_orig_mod", D), real_view, fake, eps)  # between L(X) and G(Z); eager D
        loss = loss + gp_weight * penalty
    d_opt.zero_grad(set_to_none=True)
    loss.backward()
    d_opt.step()
    return {"losses/d_loss": loss.detach(), "losses/gradient_penalty": penalty.detach(),
            "charts/d_real_score": real_scores.detach().mean(), "charts/d_fake_score": fake_scores.detach().mean()}


def lens_step(lens, D, lens_opt, real, lam: float, gan: str, reduction: str = "mean") -> dict:
    """One lens update with L_L = λ·L_A + L_R (eq. 3); D is frozen, so this step never changes D."""
    D.requires_grad_(False)
    lensed = lens(real)
    adversarial = lens_adversarial_loss(gan, D(lensed))
    reconstruction = reconstruction_loss(real, lensed, reduction)
    loss = lam * adversarial + reconstruction
    lens_opt.zero_grad(set_to_none=True)
    loss.backward()
    lens_opt.step()
    D.requires_grad_(True)
    return {"losses/lens_loss": loss.detach(), "losses/lens_adversarial": adversarial.detach(),
            "losses/lens_reconstruction": reconstruction.detach(), "charts/lambda": loss.new_tensor(lam)}


def mode_statistics(labels: torch.Tensor, num_modes: int = 1000) -> tuple[int, float]:
    """Modes covered (classes predicted at least once) and KL(p_generated ‖ uniform) in nats (VEEGAN, PacGAN)."""
    p = torch.bincount(labels.cpu(), minlength=num_modes).double() / len(labels)
    nonzero = p[p > 0]
    return int((p > 0).sum()), float((nonzero * torch.log(nonzero * num_modes)).sum())


def evaluate(G, fid, fid_noise: torch.Tensor, classifier, mode_noise: torch.Tensor, step: int) -> dict:
    """common.fid's metrics dict, as-is, against the un-lensed X; Stacked MNIST modes and KL on their own samples."""
    with full_precision():
        result = {"step": step, "fid": fid.evaluate_generator(G, fid_noise)}
        if classifier is not None:
            modes, kl = mode_statistics(classifier.predict(fid.generate(G, mode_noise)))
            result.update(modes=modes, kl=kl, mode_samples=len(mode_noise))
    return result


def sample_grid(path: Path, fake: torch.Tensor, lens, real: torch.Tensor) -> torch.Tensor:
    """8 tiles a row; with a lens each tile is G(z) | L(x), generated next to lensed real (Figs. 5, 8–10)."""
    from torchvision.utils import make_grid, save_image  # imported here: torchvision takes seconds to load
    tiles = to_float(fake)
    if lens is not None:
        with torch.no_grad():
            tiles = torch.cat([tiles, lens(real).clamp(-1, 1).cpu()], dim=3)
    save_image(grid := make_grid(tiles, nrow=8, normalize=True, value_range=(-1, 1)), path)
    return grid


def save_checkpoint(path: Path, step: int, history: list, states: dict, gens: dict) -> None:
    """Everything a bit-identical continuation needs (models, optimisers, data order, every RNG), written to a
    temporary file and renamed."""
    torch.save({"step": step, "history": history, "states": {k: v.state_dict() for k, v in states.items() if v is not None},
                "gens": {k: g.get_state() for k, g in gens.items()}, "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def load_checkpoint(path: Path, states: dict, gens: dict) -> tuple[int, list]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for k, v in states.items():
            if v is not None:
                v.load_state_dict(state["states"][k])
        for k, g in gens.items():
            g.set_state(state["gens"][k])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    except Exception as e:
        raise SystemExit(f"error: {path} is not a usable checkpoint of this run ({type(e).__name__}): "
                         "delete it to restart that configuration") from None
    return state["step"], state["history"]


def train(args: Args, seed: int, use_lens: bool, run_dir: Path, images: torch.Tensor, fid, classifier, device,
          stop: threading.Event) -> dict:
    """One configuration (seed, with or without lens) into run_dir/<config>/, from its checkpoint.pt if there is one."""
    config = f"{'lens' if use_lens else 'no-lens'}__seed{seed}"
    out = run_dir / config
    (out / "samples").mkdir(parents=True, exist_ok=True)
    G, D, lens = build_models(args, images.shape[1], seed, use_lens, device)
    g_opt, d_opt, lens_opt = (None if m is None else make_optimizer(m, args, device) for m in (G, D, lens))
    fast_G, fast_D, fast_lens = (torch.compile(m) if args.compile and m is not None else m for m in (G, D, lens))
    # one generator per random stream, each seeded by the run's seed alone: with and without the lens, the
    # same batches, the same latent noise and the same penalty ε, whatever else draws random numbers
    data_gen, noise_gen, eps_gen = (torch.Generator(device).manual_seed(seed + 7919 * i) for i in range(3))
    batches = Batches(images, batch_size=args.batch_size, generator=data_gen)  # uint8 on the device
    eval_gen = torch.Generator().manual_seed(12345)  # the same evaluation noise and grid images in every run
    fid_noise = torch.randn(args.fid_samples, args.z_dim, generator=eval_gen).to(device)
    mode_noise = torch.randn(args.mode_samples if classifier is not None else 0, args.z_dim, generator=eval_gen).to(device)
    grid_real = to_float(images[torch.randperm(len(images), generator=eval_gen)[:min(64, args.fid_samples)].to(device)])
    states = {"G": G, "D": D, "lens": lens, "g_opt": g_opt, "d_opt": d_opt, "lens_opt": lens_opt, "batches": batches}
    gens = {"noise": noise_gen, "eps": eps_gen}  # the data stream's state is in batches.state_dict()
    step, history, status, reason = 0, [], "finished", None
    if (out / "checkpoint.pt").exists():
        step, history = load_checkpoint(out / "checkpoint.pt", states, gens)
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, name=f"{run_dir.name}/{config}", config=asdict(args),
                   sync_tensorboard=True, dir=str(out), resume="allow", id=f"{run_dir.name}__{config}")
    writer = SummaryWriter(str(out))
    if step == 0:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
            f"|{k}|{v}|" for k, v in {**asdict(args), "seed": seed, "lens": use_lens}.items()))
    progress = tqdm(total=args.total_steps, initial=step, desc=config, mininterval=5, disable=None)
    last_step, last_time = step, time.time()
    while step < args.total_steps:
        if stop.is_set():  # Ctrl-C / SIGTERM: stop between whole iterations, so the checkpoint is consistent
            status = "interrupted"
            break
        # 1. D step(s): D is trained on {L(X), G(Z)} in place of {X, G(Z)}, the only change the lens makes
        for _ in range(args.n_critic):
            real = to_float(batches.next()[0])
            z = torch.randn(args.batch_size, args.z_dim, device=device, generator=noise_gen)
            stats = discriminator_step(fast_D, fast_G, fast_lens, d_opt, real, z, args.gan, args.gp_weight, eps_gen)
        # 2. G step, D frozen: G's loss (eqs. 5/9/12) does not involve the lens
        D.requires_grad_(False)
        g_loss = generator_loss(args.gan, fast_D(fast_G(torch.randn(args.batch_size, args.z_dim, device=device,
                                                                   generator=noise_gen))))
        g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        g_opt.step()
        D.requires_grad_(True)
        stats["losses/g_loss"] = g_loss.detach()
        # 3. lens step, once per generator iteration, on the last D batch: L_L = λ(t)·L_A + L_R (eqs. 2–4)
        lam = lens_weight(step, args.lens_k, 1.0 if args.lam_schedule == "fixed" else None)
        if lens is not None:
            stats.update(lens_step(fast_lens, fast_D, lens_opt, real, lam, args.gan, args.reconstruction))
        step += 1
        progress.update()
        if step % args.log_every == 0 or step == args.total_steps:
            values = dict(zip(stats, torch.stack(list(stats.values())).float().cpu().tolist()))  # one host sync
            for tag, value in values.items():
                writer.add_scalar(tag, value, step)
            writer.add_scalar("charts/SPS", (step - last_step) / max(time.time() - last_time, 1e-9), step)
            last_step, last_time = step, time.time()
            bad = [k for k, v in values.items() if not math.isfinite(v)]
            if bad:
                status, reason = "diverged", f"non-finite {', '.join(b.split('/')[1] for b in bad)} at step {step}"
                break
        if step % args.eval_every == 0 or step == args.total_steps:
            history.append(evaluate(G, fid, fid_noise, classifier, mode_noise, step))
            metrics = history[-1]["fid"]
            for tag, value in (("fid", metrics["fid"]), ("kid", metrics["kid_mean"]), ("is", metrics.get("is_mean")),
                               ("precision", metrics["precision"]), ("recall", metrics["recall"]),
                               ("modes", history[-1].get("modes")), ("kl", history[-1].get("kl"))):
                if value is not None:
                    writer.add_scalar(f"eval/{tag}", value, step)
            grid = sample_grid(out / "samples" / f"step_{step:07d}.png", fid.generate(G, fid_noise[:64]), lens, grid_real)
            writer.add_image("samples/generated_lensed" if lens is not None else "samples/generated", grid, step)
            if args.save_model:
                save_checkpoint(out / "checkpoint.pt", step, history, states, gens)
            last_step, last_time = step, time.time()  # evaluation time is not training speed
    progress.close()
    if args.save_model and status == "interrupted":
        save_checkpoint(out / "checkpoint.pt", step, history, states, gens)
    writer.close()
    if args.track: wandb.finish()  # noqa: E701
    result = {"status": status, "script": Path(__file__).name, "run_name": run_dir.name, "config": config,
              "device": str(device), "args": asdict(args), "seed": seed, "lens": use_lens, "steps": step,
              "reason": reason, "evals": history}
    (out / "results.tmp").write_text(json.dumps(result, indent=2))
    os.replace(out / "results.tmp", out / "results.json")  # never a half-written file
    return result


def summarize(results: list[dict]) -> str:
    """Markdown table from the runs' results.json dicts: one row per run, then mean ± std per lens setting."""
    fmt = lambda value, digits=2: "" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    rows = []
    for r in results:
        finite = [e for e in r["evals"] if math.isfinite(e["fid"]["fid"])]
        best = min(finite, key=lambda e: e["fid"]["fid"]) if finite else {"fid": {}}
        final = r["evals"][-1] if r["evals"] and r["status"] == "finished" else {"fid": {}}
        rows.append({"lens": "with" if r["lens"] else "without", "seed": r["seed"], "status": r["status"],
                     "steps": r["steps"], "final_fid": final["fid"].get("fid"), "best_fid": best["fid"].get("fid"),
                     "best_step": best.get("step"), "modes": final.get("modes"), "kl": final.get("kl")})
    e = next((e for r in results for e in r["evals"]), {"fid": {}})  # what produced the numbers
    lines = [f"FID: {e['fid'].get('extractor')}, {e['fid'].get('num_real')} real / {e['fid'].get('num_fake')} generated "
             "images vs the un-lensed training images" + (f"; modes and KL on {e['mode_samples']} samples" if "modes" in e
                                                          else ""), ""]
    lines += ["| lens | seed | status | steps | final FID | best FID (step) | modes | KL |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {w['lens']} | {w['seed']} | {w['status']} | {w['steps']} | {fmt(w['final_fid'])} | "
              f"{fmt(w['best_fid'])} ({fmt(w['best_step'])}) | {fmt(w['modes'])} | {fmt(w['kl'], 3)} |" for w in rows]
    lines += ["", "| lens | finished / runs | final FID | best FID | modes | KL |", "|---|---|---|---|---|---|"]
    for setting in ("with", "without"):
        group = [w for w in rows if w["lens"] == setting]
        done = [w for w in group if w["status"] == "finished"]
        cells = [f"{np.mean([w[k] for w in done]):.{d}f} ± {np.std([w[k] for w in done]):.{d}f}"
                 if done and done[0][k] is not None else "" for k, d in
                 (("final_fid", 2), ("best_fid", 2), ("modes", 1), ("kl", 3))]
        if group:
            lines.append(f"| {setting} | {len(done)} / {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_fid_curves(results: list[dict], path: Path) -> None:
    """FID against generator iterations, one line per run, with and without the lens (the paper's Figs. 5-6)."""
    import matplotlib.pyplot as plt  # imported here: only the end of a comparison draws
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot([e["step"] for e in r["evals"]], [e["fid"]["fid"] for e in r["evals"]], color="C0" if r["lens"] else "C1")
    ax.legend(handles=[plt.Line2D([], [], color=c, label=f"{w} lens") for c, w in (("C0", "with"), ("C1", "without"))])
    ax.set(xlabel="generator iteration", ylabel="FID")
    fig.savefig(path, dpi=100, bbox_inches="tight"), plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    validate(args)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    if args.threads > 0: torch.set_num_threads(args.threads)  # noqa: E701
    torch.set_float32_matmul_precision({"auto": "high" if device.type == "cuda" else "highest"}.get(args.matmul_precision, args.matmul_precision))
    torch.backends.cudnn.allow_tf32 = torch.get_float32_matmul_precision() != "highest"

    # name the run, load the data and build the FID statistics before the run folder exists: a failure leaves nothing
    run_dir = Path(args.resume) if args.resume is not None else Path(args.output_dir) / (
        args.run_name or f"{args.dataset}__{Path(__file__).stem}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}-"
                         f"{secrets.token_hex(3)}")
    if args.resume is None and run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"error: {run_dir} already exists: choose another --run-name, or continue it with "
                         f"--resume {run_dir}")
    data = load_dataset(args.dataset, "train", image_size=32, root=args.data_root)
    for flag, value in (("--fid-samples", args.fid_samples), ("--batch-size", args.batch_size)):
        if value > len(data):
            raise SystemExit(f"error: {flag} {value} exceeds the {len(data)} training images of {args.dataset}: "
                             f"lower {flag} to at most {len(data)}")
    with full_precision():  # FID always against the un-lensed training images X (Fig. 5 caption)
        fid = FID(data.x, extractor=args.fid_extractor, num_samples=args.fid_samples, root=args.data_root,
                  inception_weights=args.inception_weights, device=device, dataset=args.dataset)
        classifier = None if args.dataset != "stacked-mnist" else fid.classifier if args.fid_extractor == "digits" \
            else load_digit_classifier("stacked-mnist", args.data_root, device)  # modes (of 1,000) and KL
    images = data.x.to(device)  # uint8 on the device; each batch is converted to float when drawn

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "args.json").write_text(json.dumps(asdict(args), indent=2))
    print(f"{args.dataset}: {len(data)} images {tuple(data.x.shape[1:])}, {fid.name}, device {device}, run {run_dir}")

    stop = threading.Event()  # set by Ctrl-C/SIGTERM; the loop stops at the next step boundary
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    configs = [(seed, use_lens) for seed in range(args.seed, args.seed + args.num_seeds)
               for use_lens in {"both": (True, False), "with": (True,), "without": (False,)}[args.lens]]
    for seed, use_lens in configs:  # one configuration per call, each into its own sub-folder
        result = train(args, seed, use_lens, run_dir, images, fid, classifier, device, stop)
        if stop.is_set():
            break
        print(f"{result['config']}: {result['status']} at step {result['steps']}", result["reason"] or "")

    # the table, from the results.json files on disk (the same function builds it from runs made elsewhere)
    results = sorted((json.loads(p.read_text()) for p in run_dir.glob("*/results.json")),
                     key=lambda r: (r["seed"], not r["lens"]))
    interrupted = result["status"] == "interrupted" or (seed, use_lens) != configs[-1]
    status = "interrupted" if interrupted else "diverged" if all(r["status"] == "diverged" for r in results) else "finished"
    (run_dir / "results.tmp").write_text(json.dumps({"status": status, "script": Path(__file__).name, "run_name": run_dir.name,
                                                    "device": str(device), "args": asdict(args), "runs": results}, indent=2))
    os.replace(run_dir / "results.tmp", run_dir / "results.json")
    (run_dir / "table.md").write_text(table := summarize(results))
    plot_fid_curves(results, run_dir / "fid_curves.png")
    (run_dir / "results.md").write_text(("" if status == "finished" else f"**status: {status}**\n\n") + table)
    if status == "interrupted":
        print(f"interrupted: results in {run_dir}; " + (f"continue with: python {Path(__file__).name} --resume {run_dir}"
              if args.save_model else "no checkpoint (--save-model was off), so it cannot be resumed"))
        sys.exit(130)
    if status == "diverged":
        print(f"every run diverged; results in {run_dir}")
        sys.exit(3)
    print(f"results in {run_dir}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # before the handlers are installed
        print("interrupted before training began", file=sys.stderr)
        sys.exit(130)
