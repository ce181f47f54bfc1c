"""(α_D, α_G)-GANs: dual objectives built from α-loss, tuned to stabilise GAN training.

M. Welfert, K. Otstot, G. R. Kurri, L. Sankar, "(α_D, α_G)-GANs: Addressing GAN Training Instabilities via Dual
Objectives", ISIT 2023, https://arxiv.org/abs/2302.14320; the authors' code: github.com/SankarLab/AlphaGan-Papers-Results.

α-loss ℓ_α(y, ŷ) = α/(α−1)·(1 − y·ŷ^{(α−1)/α} − (1−y)(1−ŷ)^{(α−1)/α}) is the log-loss at α = 1. D maximises V_{α_D};
G minimises V_{α_G}'s fake term (saturating) or E ℓ_{α_G}(1, D(G(z))) (non-saturating). α_D < 1 enlarges G's gradients
far from the data, α_G > 1 shrinks them near it. Evidence: the share of seeds whose generator covers all 8 modes of a
2-D Gaussian ring (success) or none (failure); (1, 1) is the vanilla GAN.

    python alpha_dual_gan.py --preset cpu-mini          # CPU: the ring at depth 1, α_D ∈ {1, 0.5, 0.2}, stacked seeds
    python alpha_dual_gan.py --preset ring-saturating   # the paper's saturating grid, 200 seeds × 400 epochs (GPU)
    python alpha_dual_gan.py --preset celeba --inception-weights pt_inception-2015-12-05.pth   # lr sweep (GPU)
"""
from __future__ import annotations

import argparse
import collections
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

from common.datasets import load_dataset, ring_data, to_float
from common.fid import FID, full_precision, sq_distances

IMAGE_SIZE = {"celeba": 64, "celeba-crop108": 64, "lsun-classroom": 112, "stacked-mnist": 28}  # the paper's sizes
RATES = ("success", "failure", "diverged")  # ring outcome of a seed: 8/8 modes, 0/8 modes, non-finite
Config = collections.namedtuple("Config", "alpha_d alpha_g lsgan clamp_probs lr seed")  # one call of `train`


@dataclass
class Args:
    # experiment
    preset: Literal["default", "ring-saturating", "ring-non-saturating", "alpha-d-sweep", "celeba", "lsun-classroom",
                    "stacked-mnist", "cpu-mini"] = "default"
    """paper experiment to start from (its values are the defaults below; every other flag overrides them)"""
    seed: int = 1
    """first seed; seeds seed, seed+1, ... (each: its own initialisation and shuffles)"""
    num_seeds: int = 200
    """seeds per configuration (ring: trained at once as one stack; images: one sub-run each). Paper: 200 / 50"""
    cuda: bool = True
    """use CUDA when available"""
    threads: int = 0
    """torch.set_num_threads (0 = torch's default)"""
    matmul_precision: Literal["auto", "highest", "high", "medium"] = "auto"
    """training matmuls: highest = full float32; high = TF32 on CUDA (float32 elsewhere); medium = bf16-backed
    float32 on capable CPUs/GPUs (about 2× on a recent CPU); auto = high on CUDA, highest on CPU. Metrics: always full"""
    compile: bool = False
    """torch.compile the training step (G, D, losses, Adam; inductor): each configuration compiles first (tens of s)"""
    track: bool = False
    """also log to Weights & Biases (pip install wandb; honours WANDB_MODE=offline)"""
    wandb_project_name: str = "gan-stability"
    """W&B project of --track"""
    output_dir: str = "runs"
    """folder that receives <run_name>/"""
    run_name: str | None = None
    """run folder name (default: {dataset}__alpha_dual_gan__{seed}__{date-time}-{random})"""
    save_model: bool = False
    """write each configuration's checkpoint.pt at every evaluation, at the end and on Ctrl-C (for --resume)"""
    resume: str | None = None
    """continue the run in this folder from its args.json and checkpoints; flags given here override"""
    # data
    dataset: Literal["ring", "celeba", "celeba-crop108", "lsun-classroom", "stacked-mnist"] = "ring"
    """ring: 8 Gaussians (no download); images: DCGAN at the paper's size; celeba-crop108: 108×108 centre crop first"""
    data_root: str = "data"
    """root of the image datasets and caches"""
    num_train: int = 0
    """use only the first n training points/images (0 = all)"""
    # method
    alpha_ds: tuple[float, ...] = (1.0, 0.5)
    """α_D values (discriminator's α-loss; 1 = log-loss; inf allowed)"""
    alpha_gs: tuple[float, ...] = (1.0,)
    """α_G values (generator's α-loss)"""
    non_saturating: bool = False
    """non-saturating generator loss E ℓ_αG(1, D(G(z))) instead of the saturating −E ℓ_αG(0, D(G(z)))"""
    lsgan: bool = False
    """also train the LSGAN baseline (0-1 coding on D's raw output)"""
    clamp_probs: bool = False
    """the authors' α-loss: BCE on σ(z) at α = 1, σ(z) clamped to [1e-7, 1−1e-7] otherwise (default: exact logit form)"""
    both_loss_forms: bool = False
    """also run every α cell with the other loss form (exact ↔ --clamp-probs); the α_D sweep figure shows both"""
    layers: tuple[int, int] = (4, 4)
    """hidden layers of the ring's G and D (the authors' --g_layers --d_layers; paper: 4, 4)"""
    widths: tuple[int, int] = (400, 200)
    """hidden width of the ring's G and D (the authors' --g_width --d_width; paper: 400, 200)"""
    model_width: int = 64
    """DCGAN channel multiplier of G and D (the authors' --model_width)"""
    z_dim: int = 100
    """DCGAN noise dimension (the ring's noise is 2-D)"""
    # training
    epochs: int = 400
    """training epochs (paper: ring 400; images 10 … 100)"""
    batch_size: int = 128
    """batch size (paper: ring, CelebA 128; LSUN 64)"""
    lr: float = 1e-4
    """Adam learning rate of G and D (paper: ring 1e-4)"""
    lr_sweep: tuple[float, ...] = ()
    """further learning rates: every (cell, lr) pair, --lr included, is its own configuration"""
    betas: tuple[float, float] = (0.9, 0.99)
    """Adam betas (the authors' GAN class: (0.9, 0.99) in every experiment)"""
    # evaluation
    eval_every: int = 50
    """evaluate every this many epochs and at the end (ring: mode metrics of all seeds; images: FID); 0 = end only"""
    fid_extractor: Literal["inception", "digits"] = "inception"
    """images: FID network; digits = in-domain digit CNN (stacked-mnist)"""
    fid_samples: int = 10_000
    """images: real and generated samples per FID (at most the held-out split)"""
    inception_weights: str | None = None
    """path of the FID Inception weights (pt_inception-2015-12-05 .pth) where there is no network"""


IMAGES = dict(non_saturating=True, alpha_ds=(0.5, 0.6, 0.7, 0.8, 0.9, 1.0), lsgan=True, clamp_probs=True, num_seeds=50,
              epochs=100, eval_every=10)  # slides "[Celeb-A]/[LSUN] GANs": NS, α_G = 1, α_D ∈ [0.5, 1], LSGAN, 50 seeds
PRESETS: dict[str, Args] = {
    "default": Args(),
    # tables "saturating (α_D, α_G)-GAN success/failure rates": α_D 0.5..1.0 × α_G 0.9..1.2, the authors' loss
    "ring-saturating": Args(preset="ring-saturating", alpha_ds=(0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
                            alpha_gs=(0.9, 1.0, 1.1, 1.2), clamp_probs=True),
    # table "non-saturating success rates": α_D 0.5..1.2 × α_G 0.8..1.3, LSGAN 33%
    "ring-non-saturating": Args(preset="ring-non-saturating", non_saturating=True, lsgan=True, clamp_probs=True,
                                alpha_ds=(0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2), alpha_gs=(0.8, 0.9, 1.0, 1.1, 1.2, 1.3)),
    # "plot of saturating (α_D, 1)-GAN results", α_D 0.2..1.0 (--both-loss-forms adds the exact loss beside it)
    "alpha-d-sweep": Args(preset="alpha-d-sweep", alpha_ds=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), clamp_probs=True),
    # the authors' CelebA metric files: lr ∈ {1, 2, 5, 6, 7, 8, 9, 10}·1e-4, batch 128, FID every 10 epochs
    "celeba": Args(preset="celeba", dataset="celeba", **IMAGES, lr_sweep=(2e-4, 5e-4, 6e-4, 7e-4, 8e-4, 9e-4, 1e-3)),
    # the authors' LSUN metric files: lr ∈ {1 … 5}·1e-4, batch 64; 112×112 with 7×7 first/last kernels
    "lsun-classroom": Args(preset="lsun-classroom", dataset="lsun-classroom", **IMAGES, batch_size=64,
                           lr_sweep=(2e-4, 3e-4, 4e-4, 5e-4)),
    # the authors' stacked_mnist.py: batch 64, 50 epochs; modes of 1,000 counted by a digit classifier
    "stacked-mnist": Args(preset="stacked-mnist", dataset="stacked-mnist", **{**IMAGES, "epochs": 50}, batch_size=64,
                          lr_sweep=(2e-4, 5e-4, 1e-3), fid_extractor="digits"),
    # CPU scale: the authors' depth option at 1 hidden layer, 10 seeds × 400 epochs per cell; saturating, α_G = 1
    "cpu-mini": Args(preset="cpu-mini", alpha_ds=(1.0, 0.5, 0.2), layers=(1, 1), num_seeds=10, clamp_probs=True,
                     eval_every=100),
}


def load_saved_args(run_dir: Path) -> Args:
    """The Args a run saved in RUN_DIR/args.json, with resume = RUN_DIR."""
    try:
        saved = json.loads((run_dir / "args.json").read_text())
    except (OSError, ValueError):
        raise SystemExit(f"error: {run_dir}/args.json is missing or corrupt: --resume takes a run folder written by "
                         "this script (it holds args.json)") from None
    return replace(Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()
                           if k in {f.name for f in fields(Args)}}), resume=str(run_dir))


def parse_args(argv: list[str] | None = None) -> Args:
    """--preset (or --resume's saved args.json) becomes tyro's default: every other flag overrides it."""
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


def alpha_loss(logits: torch.Tensor, target: int, alpha: float, clamp_probs: bool = False) -> torch.Tensor:
    """Per-sample ℓ_α(y, σ(z)), y = target ∈ {0, 1}, α ∈ (0, ∞]. Exact logit form: c = 1 − 1/α, s = softplus(∓z) =
    −log σ(±z), ℓ = (1 − e^{−c·s})/c. clamp_probs: the authors' AlphaLoss, BCELoss(σ(z)) at α = 1 (its log clamped
    at −100), else A·(1 − ŷ_y^{1/A}), A = α/(α−1), on σ(z) clamped to [1e-7, 1 − 1e-7]."""
    if not alpha > 0:
        raise ValueError(f"α must be in (0, ∞], got {alpha}")
    if clamp_probs:
        prob = torch.sigmoid(logits)
        if alpha == 1:
            return F.binary_cross_entropy(prob, torch.full_like(prob, target), reduction="none")
        prob = prob.clamp(1e-7, 1 - 1e-7)  # the authors' ep
        a = 1.0 if math.isinf(alpha) else alpha / (alpha - 1)  # A → 1 as α → ∞ (their code computes ∞/∞ = NaN)
        return a * (1 - (prob if target == 1 else 1 - prob) ** (1 / a))
    neg_log_prob = F.softplus(-logits if target == 1 else logits)  # −log σ(±z), exact for large |z|
    if alpha == 1:
        return neg_log_prob
    c = 1.0 if math.isinf(alpha) else 1 - 1 / alpha
    u = c * neg_log_prob
    # expm1's backward (output + 1) rounds to 0 once e^{−u} < float eps; for u > 1, (1 − e^{−u})/c has no
    # cancellation and an exact gradient. The clamps keep the unused branch finite.
    return torch.where(u > 1, (1 - torch.exp(-u.clamp(min=1))) / c, -torch.expm1(-u.clamp(max=1)) / c)


def discriminator_loss(d_real, d_fake, alpha_d: float, lsgan: bool = False, clamp_probs: bool = False):
    """D's loss −V_αD = E ℓ_αD(1, D(x)) + E ℓ_αD(0, D(G(z))); LSGAN (raw output): ½E(D(x) − 1)² + ½E D(G(z))²."""
    if lsgan:
        return 0.5 * (d_real - 1).square().mean(-1) + 0.5 * d_fake.square().mean(-1)
    return alpha_loss(d_real, 1, alpha_d, clamp_probs).mean(-1) + alpha_loss(d_fake, 0, alpha_d, clamp_probs).mean(-1)


def generator_loss(d_fake, alpha_g: float, non_saturating: bool, lsgan: bool = False, clamp_probs: bool = False):
    """G's loss: saturating −E ℓ_αG(0, D(G(z))); non-saturating E ℓ_αG(1, D(G(z))); LSGAN ½E(D(G(z)) − 1)²."""
    if lsgan:
        return 0.5 * (d_fake - 1).square().mean(-1)
    if non_saturating:
        return alpha_loss(d_fake, 1, alpha_g, clamp_probs).mean(-1)
    return -alpha_loss(d_fake, 0, alpha_g, clamp_probs).mean(-1)


def train_step(gen_net, disc_net, opt_g, opt_d, real, noise, alive, alpha_d, alpha_g, non_saturating, lsgan=False,
               clamp_probs=False):
    """One 1:1 alternation as the authors' train_loop: D step on fake.detach(), then G through the updated D on the
    same fake batch. Ring: S×B×2 batches of S stacked seeds (dead members' losses masked to 0); images: one seed."""
    fake = gen_net(noise)
    torch._dynamo.graph_break()  # no-op in eager; compiled, G's graph ends here so D's backward keeps what G's needs
    d_loss = discriminator_loss(disc_net(real).squeeze(-1), disc_net(fake.detach()).squeeze(-1), alpha_d, lsgan,
                                clamp_probs)
    opt_d.zero_grad(set_to_none=True)
    torch.where(alive, d_loss, 0.0).sum().backward()
    opt_d.step()
    disc_net.requires_grad_(False)  # the G step needs gradients through D, not for D's weights
    g_loss = generator_loss(disc_net(fake).squeeze(-1), alpha_g, non_saturating, lsgan, clamp_probs)
    opt_g.zero_grad(set_to_none=True)
    torch.where(alive, g_loss, 0.0).sum().backward()
    disc_net.requires_grad_(True)
    opt_g.step()
    return d_loss.detach(), g_loss.detach(), alive & torch.isfinite(d_loss.detach()) & torch.isfinite(g_loss.detach())


class StackedMLP(nn.Module):
    """S independent MLPs (S×B×in → S×B×out); member s initialised as nn.Linear (U(±1/√fan_in)) from generators[s]."""

    def __init__(self, sizes: list[int], generators: list[torch.Generator], negative_slope: float = 0.0):
        super().__init__()
        self.negative_slope = negative_slope
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            for params, shape in ((self.weights, (fan_in, fan_out)), (self.biases, (1, fan_out))):
                params.append(nn.Parameter(torch.stack([(torch.rand(*shape, generator=g) * 2 - 1) / math.sqrt(fan_in)
                                                        for g in generators])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)  # b + x @ w for every stack member in one call
            if i < len(self.weights) - 1:
                x = F.leaky_relu(x, self.negative_slope) if self.negative_slope else F.relu(x)
        return x


def ring_networks(seeds: list[int], width_g: int = 400, width_d: int = 200, device: torch.device | str = "cpu",
                  g_layers: int = 4, d_layers: int = 4) -> tuple[StackedMLP, StackedMLP, list]:
    """Stacked G (ReLU) and D (LeakyReLU 0.2) as the authors' 2D.py; seed s: init from torch.Generator(s), G then D."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    gen_net = StackedMLP([2, *[width_g] * g_layers, 2], gens)
    disc_net = StackedMLP([2, *[width_d] * d_layers, 1], gens, negative_slope=0.2)
    return gen_net.to(device), disc_net.to(device), [torch.Generator(device).manual_seed(s) for s in seeds]


def adam(params, lr: float, betas: tuple[float, float], device: torch.device) -> torch.optim.Adam:
    """Adam is elementwise, so one Adam over stacked parameters is exactly per-seed Adam. Fused on CUDA."""
    return torch.optim.Adam(params, lr=lr, betas=betas, **{"fused" if device.type == "cuda" else "foreach": True})


def ring_metrics(samples: torch.Tensor, centers: torch.Tensor, std: float) -> dict[str, torch.Tensor]:
    """The authors' compute_metrics for S sample sets (S×N×2): each sample goes to its nearest mode; a mode counts
    when a sample assigned to it lies within 3·std; hq = share of samples within 3·std of their mode; KL(P_real ‖
    P_fake) over the modes, P_real = the true 1/8, P_fake = (counts + 1)/(N + 8). A non-finite set: finite False."""
    finite = torch.isfinite(samples).all(-1).all(-1)
    with full_precision():
        dist2, mode = sq_distances(torch.nan_to_num(samples, 0.0, 0.0, 0.0), centers).min(-1)
    close, one_hot = dist2 <= (3 * std) ** 2, F.one_hot(mode, len(centers)).double()
    p_fake, p_real = (one_hot.sum(1) + 1) / (samples.shape[1] + len(centers)), 1 / len(centers)
    return {"modes": torch.where(finite, ((one_hot * close.unsqueeze(-1)).sum(1) > 0).sum(-1), 0).cpu(),
            "hq": torch.where(finite, close.double().mean(-1), 0.0).cpu(),
            "kl": torch.where(finite, (p_real * (math.log(p_real) - p_fake.log())).sum(-1), math.nan).cpu(),
            "finite": finite.cpu()}


def dcgan(image_size: int, channels: int, z_dim: int = 100, width: int = 64) -> tuple[nn.Module, nn.Module]:
    """The authors' DCGAN pair: G = ConvT(z → ·, k×k) + 4×4 stride-2 ConvT/BN/ReLU blocks, Tanh; D = 4×4 stride-2
    convs, LeakyReLU 0.2 (no BN on the first), a k×k conv to one logit; k = 7 for 7·2^m sizes (LSUN 112), else 4."""
    base = 7 if image_size % 7 == 0 else 4
    widths = [width * 2 ** i for i in reversed(range(int(math.log2(image_size // base))))]  # 512 … 64 for 64×64
    g_layers = [nn.ConvTranspose2d(z_dim, widths[0], base, 1, 0, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(True)]
    for w_in, w_out in zip(widths[:-1], widths[1:]):
        g_layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), nn.ReLU(True)]
    g_layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1, bias=False), nn.Tanh()]
    d_layers = [nn.Conv2d(channels, widths[-1], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
    for w_in, w_out in zip(widths[::-1][:-1], widths[::-1][1:]):
        d_layers += [nn.Conv2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), nn.LeakyReLU(0.2, True)]
    d_layers += [nn.Conv2d(widths[0], 1, base, 1, 0, bias=False), nn.Flatten()]
    gen_net, disc_net = nn.Sequential(nn.Unflatten(1, (z_dim, 1, 1)), *g_layers), nn.Sequential(*d_layers)
    for m in [*gen_net.modules(), *disc_net.modules()]:  # convs N(0, 0.02), BN weights N(1, 0.02), BN biases 0
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)):
            nn.init.normal_(m.weight, float(isinstance(m, nn.BatchNorm2d)), 0.02)
    return gen_net, disc_net


def train(args: Args, cfg: Config, train_x: torch.Tensor, noise: torch.Tensor, device: torch.device, out: Path,
          stop: threading.Event, ring=None, fid: FID | None = None, fid_noise: torch.Tensor | None = None) -> dict:
    """Train one configuration (ring: a stack of args.num_seeds seeds; images: one seed); write its results.json."""
    seeds = list(range(cfg.seed, cfg.seed + (args.num_seeds if ring else 1)))
    if ring:
        gen_net, disc_net, shuffles = ring_networks(seeds, *args.widths, device, *args.layers)
    else:
        torch.manual_seed(cfg.seed)
        gen_net, disc_net = (m.to(device) for m in dcgan(train_x.shape[-1], train_x.shape[1], args.z_dim, args.model_width))
        shuffles = [torch.Generator(device).manual_seed(cfg.seed)]
    opt_g, opt_d = (adam(m.parameters(), cfg.lr, args.betas, device) for m in (gen_net, disc_net))
    step_fn = torch.compile(train_step) if args.compile else train_step  # compiled afresh per configuration:
    torch._dynamo.reset()  # new modules and α would otherwise pile up recompilations in one cache
    n, batch, steps_per_epoch = len(train_x), args.batch_size, math.ceil(len(train_x) / args.batch_size)  # last: smaller
    total, step, history, perms = steps_per_epoch * args.epochs, 0, [], None
    alive, died_at = torch.ones(len(seeds), dtype=torch.bool, device=device), torch.full((len(seeds),), -1, device=device)
    if (out / "checkpoint.pt").exists():  # --resume: the state after `step` steps, every random generator included
        try:
            ck = torch.load(out / "checkpoint.pt", map_location=device, weights_only=False)
        except Exception:
            raise SystemExit(f"error: {out}/checkpoint.pt is corrupt: delete it to restart that configuration") from None
        for module, state in zip((gen_net, disc_net, opt_g, opt_d), ck["states"]):
            module.load_state_dict(state)
        alive, died_at, step, history = ck["alive"], ck["died_at"], ck["step"], ck["history"]
        for g, state in zip(shuffles, ck["shuffles"]): g.set_state(state.cpu())  # noqa: E701 (as at its epoch's start)
        torch.set_rng_state(ck["rng"][0].cpu()), torch.cuda.set_rng_state_all([r.cpu() for r in ck["rng"][1:]])
    out.mkdir(parents=True, exist_ok=True)
    writer, start, start_step = SummaryWriter(str(out)), time.time(), step
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    bar = tqdm(total=total, initial=step, desc=out.name, mininterval=5, disable=not sys.stdout.isatty())
    while step < total and not stop.is_set():
        k = step % steps_per_epoch
        if k == 0 or perms is None:  # per seed and epoch, one permutation of the data and one of the noise set
            epoch_start = [g.get_state() for g in shuffles]
            perms = torch.stack([torch.stack([torch.randperm(n, generator=g, device=device) for g in shuffles])
                                 for _ in range(2)])
        real, z = train_x[perms[0, :, k * batch:(k + 1) * batch]], noise[perms[1, :, k * batch:(k + 1) * batch]]
        real, z = (real, z) if ring else (to_float(real[0]), z[0])  # images: one seed, uint8 → [-1, 1] per batch
        # the paper's idea: D descends E ℓ_αD(1, D(x)) + E ℓ_αD(0, D(G(z))); G its own α_G objective
        d_loss, g_loss, still_alive = step_fn(gen_net, disc_net, opt_g, opt_d, real, z, alive, cfg.alpha_d,
                                              cfg.alpha_g, args.non_saturating, cfg.lsgan, cfg.clamp_probs)
        died_at = torch.where(alive & ~still_alive, step, died_at)  # a non-finite seed is masked, reported diverged
        alive, step = still_alive, step + 1
        bar.update(1)
        evaluate = step == total or args.eval_every and step % (steps_per_epoch * args.eval_every) == 0
        if step % 100 == 0 or evaluate:  # losses every 100 steps: one host sync
            n_alive = int(alive.sum())
            if n_alive == 0 and not ring:
                break  # the image seed diverged
            for name, loss in (("d_loss", d_loss), ("g_loss", g_loss)):
                writer.add_scalar(f"losses/{name}", float(torch.where(alive, loss, 0).sum()) / max(n_alive, 1), step)
            writer.add_scalar("charts/SPS", (step - start_step) / (time.time() - start), step)
        if evaluate and ring:
            with torch.no_grad():  # G_s(test noise) for every seed s, in chunks
                fake = torch.cat([gen_net(z.expand(len(seeds), -1, -1)) for z in ring.test_noise.to(device).split(4096)], 1)
            m = ring_metrics(fake, ring.centers.to(device), ring.std)
            per_seed = [{"seed": s, "modes": int(m["modes"][i]), "hq": float(m["hq"][i]), "kl": float(m["kl"][i]),
                         "status": "diverged" if died_at[i] >= 0 or not m["finite"][i] else
                         {8: "success", 0: "failure"}.get(int(m["modes"][i]), "partial")} for i, s in enumerate(seeds)]
            history.append({"epoch": step // steps_per_epoch, "step": step, "per_seed": per_seed})
            for key in RATES:
                writer.add_scalar(f"eval/{key}_rate", sum(r["status"] == key for r in per_seed) / len(seeds), step)
        elif evaluate:
            images = fid.generate(gen_net, fid_noise)
            history.append({"epoch": step // steps_per_epoch, "step": step, **fid.evaluate(images)})
            if args.fid_extractor == "digits":  # Stacked MNIST: modes hit (of 1,000) by the digit classifier
                history[-1]["modes"] = len(fid.classifier.predict(images).unique())
            for key in ("fid", "kid_mean", "is_mean", "precision", "recall", "modes"):
                if key in history[-1]:
                    writer.add_scalar(f"eval/{key.removesuffix('_mean')}", history[-1][key], step)
        if args.save_model and (evaluate or stop.is_set()):
            torch.save({"states": [m.state_dict() for m in (gen_net, disc_net, opt_g, opt_d)], "alive": alive,
                        "died_at": died_at, "step": step, "history": history,
                        "shuffles": [g.get_state() for g in shuffles] if k == steps_per_epoch - 1 else epoch_start,
                        "rng": [torch.get_rng_state(), *torch.cuda.get_rng_state_all()]}, out / "checkpoint.tmp")
            os.replace(out / "checkpoint.tmp", out / "checkpoint.pt")  # write then rename
    bar.close(), writer.close()
    result = {"status": "diverged" if not alive.any() else "interrupted" if step < total else "finished",
              "script": Path(__file__).name, "run_name": out.parent.name, "device": str(device), "name": out.name,
              "experiment": args.dataset, **cfg._asdict(), "seeds": seeds, "steps": step, "epochs": step / steps_per_epoch,
              "diverged_at_step": died_at.tolist(), "history": history,
              "seed_epochs_per_s": len(seeds) * (step - start_step) / steps_per_epoch / max(time.time() - start, 1e-9)}
    if not ring:  # one row of fixed-noise samples per seed (the paper's "samples across seeds")
        from torchvision.utils import save_image  # imported here: torchvision takes seconds to import
        save_image(fid.generate(gen_net, fid_noise[:8]) / 255, out / "samples.png", nrow=8)
    (out / "results.tmp").write_text(json.dumps({**result, "args": asdict(args)}, indent=2, default=float))
    os.replace(out / "results.tmp", out / "results.json")  # write then rename: never a half-written file
    return result


def aggregate(results: list[dict]) -> list[dict]:
    """One row per (cell, loss form, lr). Ring: outcomes with Wilson 95% intervals (diverged is its own column, never
    a failure), means over the finite seeds. Images: mean ± std FID over the finished seeds, final and per epoch."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if r["status"] != "interrupted":
            groups.setdefault((r["alpha_d"], r["alpha_g"], r["lsgan"], r["clamp_probs"], r["lr"]), []).append(r)
    rows, z = [], 1.96
    for (alpha_d, alpha_g, lsgan, clamp, lr), runs in groups.items():
        row = {"cell": "lsgan" if lsgan else f"({alpha_d:g}, {alpha_g:g})", "alpha_d": alpha_d, "alpha_g": alpha_g,
               "lsgan": lsgan, "loss": "lsgan" if lsgan else "clamped" if clamp else "exact", "lr": lr}
        if runs[0]["experiment"] == "ring":
            per_seed = list({p["seed"]: p for r in runs for p in r["history"][-1]["per_seed"]}.values())  # 1 row a seed
            ok = [r for r in per_seed if r["status"] != "diverged"] or [dict(modes=math.nan, hq=math.nan, kl=math.nan)]
            row.update({k: sum(r["status"] == k for r in per_seed) for k in RATES}, seeds=len(per_seed),
                       mean_modes=float(np.mean([r["modes"] for r in ok])), mean_hq=float(np.mean([r["hq"] for r in ok])),
                       median_kl=float(np.median([r["kl"] for r in ok])))
            for key, n in ((key, row["seeds"]) for key in RATES):  # Wilson score interval of the rate k/n
                p, half = row[key] / n, z * math.sqrt(row[key] / n * (1 - row[key] / n) / n + z * z / (4 * n * n))
                row[f"{key}_ci95"] = [max(0.0, (p + z * z / (2 * n) - half) / (1 + z * z / n)),
                                      min(1.0, (p + z * z / (2 * n) + half) / (1 + z * z / n))]
        else:
            done, per_epoch = [r for r in runs if r["status"] == "finished"], {}
            for entry in (e for r in done for e in r["history"]):
                per_epoch.setdefault(entry["epoch"], []).append([entry["fid"], entry.get("modes", math.nan)])
            final = np.array(per_epoch[max(per_epoch)] if per_epoch else [[math.nan] * 2])
            row.update(seeds=len(runs), diverged=len(runs) - len(done), fid_mean=float(final[:, 0].mean()),
                       fid_std=float(final[:, 0].std()), modes_mean=float(final[:, 1].mean()),
                       per_epoch={e: [float(np.mean(v, 0)[0]), float(np.std(v, 0)[0])] for e, v in per_epoch.items()})
        rows.append(row)
    return sorted(rows, key=lambda r: (r["lsgan"], r["loss"], r["lr"], r["alpha_g"], -r["alpha_d"]))


def md_table(header: list, rows: list[list]) -> list[str]:
    return ["| " + " | ".join(map(str, header)) + " |", "|---" * len(header) + "|",
            *("| " + " | ".join(map(str, r)) + " |" for r in rows)]


def summarize(results: list[dict]) -> str:
    """The Markdown tables of a run, built from its configurations' results.json dicts (also from runs made elsewhere)."""
    rows = aggregate(results)
    if not rows:
        return "no configuration has finished yet\n"
    if "fid_mean" in rows[0]:  # per-epoch means: results.json and fid_over_epoch.png
        return "\n".join(md_table(["cell", "loss", "lr", "seeds", "diverged", "final FID (mean ± std)", "final modes"], [
            [r["cell"], r["loss"], f"{r['lr']:g}", r["seeds"], r["diverged"], f"{r['fid_mean']:.2f} ± {r['fid_std']:.2f}",
             f"{r['modes_mean']:.0f}"] for r in rows])) + "\n"
    lines = md_table(["cell", "loss", "lr", "seeds", *(f"{k} % (95% CI)" for k in RATES), "mean modes", "mean HQ",
                      "median KL"], [[r["cell"], r["loss"], f"{r['lr']:g}", r["seeds"], *(
                          f"{100 * r[k] / r['seeds']:.0f} ({100 * r[k + '_ci95'][0]:.0f}–{100 * r[k + '_ci95'][1]:.0f})"
                          for k in RATES), f"{r['mean_modes']:.2f}", f"{r['mean_hq']:.3f}", f"{r['median_kl']:.3f}"]
                                     for r in rows])
    grids: dict[tuple, dict] = {}  # (loss form, lr) → {(α_D, α_G): row}, in the paper's layout: rows α_G, columns α_D
    for r in rows:
        grids.setdefault((r["loss"], r["lr"]), {})[r["alpha_d"], r["alpha_g"]] = r
    for (loss, lr), grid in grids.items():
        a_ds, a_gs = sorted({d for d, _ in grid}), sorted({g for _, g in grid})
        for key in (*RATES, "mean_hq", "median_kl") if loss != "lsgan" else ():
            lines += ["", f"**{key}** ({'% of seeds' if key in RATES else 'over the finite seeds'}), {loss} α-loss, "
                      f"lr {lr:g}", ""] + md_table(["α_G \\ α_D", *(f"{d:g}" for d in a_ds)], [[f"{g:g}", *(
                          "" if (d, g) not in grid else f"{100 * grid[d, g][key] / grid[d, g]['seeds']:.0f}"
                          if key in RATES else f"{grid[d, g][key]:.3f}" for d in a_ds)] for g in a_gs])
    return "\n".join(lines) + "\n"


def draw_figures(results: list[dict], run_dir: Path) -> list[str]:
    """Ring: outcomes over α_D at α_G = 1 (Wilson bars). Images: mean FID ± std over lr and over epoch (the paper's)."""
    import matplotlib.pyplot as plt  # imported here: only the end of a run draws
    figures: dict[str, dict[str, list]] = {}  # file → label → points (x, y, error)
    for r in sorted(aggregate(results), key=lambda r: (r["lr"], r["alpha_d"])):
        if "success" in r and not r["lsgan"] and r["alpha_g"] == 1:
            for key in RATES:
                y, (lo, hi) = 100 * r[key] / r["seeds"], r[f"{key}_ci95"]
                figures.setdefault("alpha_d_sweep.png", {}).setdefault(f"{key}, {r['loss']}, lr {r['lr']:g}", []).append(
                    (r["alpha_d"], y, (y - 100 * lo, 100 * hi - y)))
        elif "fid_mean" in r and r["per_epoch"]:
            figures.setdefault("fid_over_lr.png", {}).setdefault(f"{r['cell']} {r['loss']}", []).append(
                (r["lr"], r["fid_mean"], r["fid_std"]))
            figures.setdefault("fid_over_epoch.png", {})[f"{r['cell']} {r['loss']} lr {r['lr']:g}"] = [
                (e, m, sd) for e, (m, sd) in sorted(r["per_epoch"].items())]
    for name, series in figures.items():
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for label, points in series.items():
            x, y, err = zip(*sorted(points))
            ax.errorbar(x, y, yerr=np.array(err).T, marker="o", capsize=3, label=label)
        ax.set(**{"alpha_d_sweep.png": dict(xlabel="α_D (α_G = 1)", ylabel="% of seeds"), "fid_over_lr.png": dict(
            xlabel="learning rate", xscale="log", ylabel="mean FID (± std over seeds)"), "fid_over_epoch.png": dict(
            xlabel="epoch", yscale="log", ylabel="mean FID (± std over seeds)")}[name]), ax.legend(fontsize=6)
        fig.tight_layout(), fig.savefig(run_dir / name, dpi=90), plt.close(fig)
    return list(figures)


def validate(args: Args) -> None:
    """Every user error before anything is written: one line naming the flag that fixes it."""
    for name, values in dict(lr=(args.lr,), lr_sweep=args.lr_sweep, alpha_ds=args.alpha_ds, alpha_gs=args.alpha_gs,
                             betas=args.betas).items():  # α = inf is the paper's α = ∞
        if not all(0 <= v < 1 if name == "betas" else v > 0 and (v < math.inf or "alpha" in name) for v in values) \
                or not values and "alpha" in name:
            raise SystemExit(f"error: --{name.replace('_', '-')} is {getattr(args, name)}: give " + (
                "numbers in [0, 1)" if name == "betas" else "finite numbers > 0" + " (or inf)" * ("alpha" in name)))
    for name, low in dict(num_seeds=1, epochs=1, batch_size=1, layers=1, widths=1, z_dim=1, model_width=1, num_train=0,
                          eval_every=0, threads=0, fid_samples=2).items():
        if min(np.atleast_1d(getattr(args, name))) < low:
            raise SystemExit(f"error: --{name.replace('_', '-')} is {getattr(args, name)}: give integers >= {low}")
    if args.track and importlib.util.find_spec("wandb") is None:
        raise SystemExit("error: --track needs Weights & Biases: pip install wandb, or drop --track")


def load_images(args: Args) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 train / held-out images; CelebA (all faces) and LSUN classroom_train split 80/20 (seed 0) as the authors."""
    size, root, folder = IMAGE_SIZE[args.dataset], args.data_root, Path(args.data_root) / "celeba" / "img_align_celeba"
    if args.dataset == "stacked-mnist":
        return load_dataset(args.dataset, "train", size, root).x, load_dataset(args.dataset, "test", size, root).x
    if args.dataset == "lsun-classroom":
        x = load_dataset("lsun-classroom", "train", size, root).x
    elif args.dataset == "celeba-crop108":
        x = torch.cat([load_dataset("celeba", split, size, root).x for split in ("train", "test")])
    elif folder.is_dir():  # Resize(64) + CenterCrop(64) = centre square crop, then resize: what the folder loader does
        x = load_dataset(f"folder:{folder}", "train", size, root).x
    else:
        raise SystemExit(f"error: no CelebA images in {folder}: put the aligned faces there, or pass --data-root")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:int(0.8 * len(x))]], x[perm[int(0.8 * len(x)):]]


def main() -> None:
    args = parse_args()
    validate(args)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    if args.threads > 0: torch.set_num_threads(args.threads)  # noqa: E701
    torch.set_float32_matmul_precision(
        {"auto": "high" if device.type == "cuda" else "highest"}.get(args.matmul_precision, args.matmul_precision))
    torch.backends.cudnn.allow_tf32 = torch.get_float32_matmul_precision() != "highest"
    torch.backends.cudnn.deterministic = True  # as the authors: same seed, same device → same numbers
    # data and the FID's real statistics before the run folder exists: a failure leaves nothing behind
    ring = ring_data() if args.dataset == "ring" else None
    train_x, test_x = (ring.train, ring.test) if ring else load_images(args)
    if args.num_train > len(train_x) or (not ring and args.fid_samples > len(test_x)):
        raise SystemExit(f"error: --num-train {args.num_train} or --fid-samples {args.fid_samples} exceeds the "
                         f"{len(train_x)} training / {len(test_x)} held-out samples: lower it")
    train_x = train_x[:args.num_train or len(train_x)].to(device)
    # like the authors: a fixed noise set, one N(0, I) vector per training sample, shuffled on its own
    noise = ring.train_noise if ring else torch.randn(len(train_x), args.z_dim, generator=torch.Generator().manual_seed(1))
    noise = noise[:len(train_x)].to(device)
    fid_noise = torch.randn(args.fid_samples, args.z_dim, generator=torch.Generator().manual_seed(2)).to(device)
    fid = None if ring else FID(test_x, args.fid_extractor, args.fid_samples, args.data_root, args.inception_weights,
                                device, dataset=args.dataset, progress=sys.stdout.isatty())
    run_dir = Path(args.resume or Path(args.output_dir) / (args.run_name or "__".join(
        [args.dataset, Path(__file__).stem, str(args.seed), time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)])))
    if args.resume and not list(run_dir.glob("*/checkpoint.pt")):
        raise SystemExit(f"error: {run_dir} has no checkpoint.pt: only runs started with --save-model can be resumed")
    if not args.resume and run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"error: {run_dir} already exists: choose another --run-name, or continue it with "
                         f"--resume {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "args.json").write_text(json.dumps(asdict(args), indent=2))
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, name=run_dir.name, config=asdict(args), sync_tensorboard=True,
                   dir=str(run_dir), resume="allow", id=run_dir.name)
    forms = (args.clamp_probs, not args.clamp_probs) if args.both_loss_forms else (args.clamp_probs,)
    cells = [(d, g, False, c) for c in forms for g in args.alpha_gs for d in args.alpha_ds]
    cells += [(1.0, 1.0, True, False)] * args.lsgan  # LSGAN: one cell, no α
    seeds = [args.seed] if ring else range(args.seed, args.seed + args.num_seeds)  # ring: the first seed of a stack
    configs = [Config(*cell, lr, s) for lr in dict.fromkeys((args.lr, *args.lr_sweep)) for cell in cells for s in seeds]
    stop = threading.Event()  # set by Ctrl-C/SIGTERM; training stops at the next step boundary
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    results = []
    for cfg in configs:
        out = run_dir / (("lsgan" if cfg.lsgan else f"ad{cfg.alpha_d:g}_ag{cfg.alpha_g:g}" + "_clamped" * cfg.clamp_probs)
                         + f"_lr{cfg.lr:g}" + ("" if ring else f"_seed{cfg.seed}"))
        done = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None
        if done and done["status"] != "interrupted" and done["args"]["epochs"] == args.epochs:
            results.append(done)  # finished before this --resume
        else:
            results.append(train(args, cfg, train_x, noise, device, out, stop, ring, fid, fid_noise))
        if stop.is_set():
            break
    status = ("interrupted" if len(results) < len(configs) or results[-1]["status"] == "interrupted" else
              "diverged" if all(r["status"] == "diverged" for r in results) else "finished")
    summary = {"status": status, "script": Path(__file__).name, "run_name": run_dir.name, "device": str(device),
               "args": asdict(args), "configs": aggregate(results), "figures": draw_figures(results, run_dir)}
    (run_dir / "results.tmp").write_text(json.dumps(summary, indent=2))
    os.replace(run_dir / "results.tmp", run_dir / "results.json")
    (run_dir / "table.md").write_text(table := summarize(results))
    (run_dir / "results.md").write_text(("" if status == "finished" else f"**Status: {status}.**\n\n") + table)
    if status == "interrupted":
        print(f"interrupted: results so far in {run_dir / 'results.md'}; " + (
            f"checkpoints kept, continue with: python {Path(__file__).name} --resume {run_dir}" if args.save_model
            else "no checkpoint (run without --save-model)"))
        sys.exit(130)
    print(table + (f"\nevery configuration diverged: see {run_dir / 'results.md'}" if status == "diverged" else ""))
    sys.exit(3 if status == "diverged" else 0)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C before the handlers were installed: nothing was trained yet
        print("interrupted before training started")
        sys.exit(130)
