"""(α_D, α_G)-GANs: dual objectives built from α-loss, tuned to stabilise GAN training.

Paper: M. Welfert, K. Otstot, G. R. Kurri, L. Sankar, "(α_D, α_G)-GANs: Addressing GAN Training
Instabilities via Dual Objectives", ISIT 2023, https://arxiv.org/abs/2302.14320; the experiments follow
K. Otstot, "Towards Addressing GAN Training Instabilities: Dual-Objective GANs with Tunable Parameters"
(M.S. thesis defence, Arizona State University, 2023), incl. the CelebA / LSUN DCGAN runs.

α-loss ℓ_α(y, ŷ) = α/(α−1)·(1 − y·ŷ^{(α−1)/α} − (1−y)(1−ŷ)^{(α−1)/α}) interpolates between the
exponential-like loss (α → 0), log-loss (α = 1) and the soft 0-1 loss (α = ∞). The (α_D, α_G)-GAN
lets the discriminator maximise V_{α_D} and the generator minimise V_{α_G} (saturating) or
E ℓ_{α_G}(1, D(G(z))) (non-saturating). The optimal D is the α_D-tilted posterior
p_r^α_D / (p_r^α_D + p_g^α_D); α_D < 1 enlarges the generator's gradients far from the data (against
vanishing gradients), α_G > 1 shrinks them near the data (against exploding gradients). The paper's
main evidence is the share of 200 seeds that cover all 8 modes of a 2-D Gaussian ring (success) or
none (failure); (1, 1) is the vanilla GAN.

    # default: 2-D ring, vanilla (1,1) vs (0.5,1), 8 stacked seeds each, 5 epochs (one CPU core: ~15–20 min)
    python alpha_dual_gan.py
    # the paper's saturating grid, full protocol (200 seeds × 400 epochs per cell; for a GPU)
    python alpha_dual_gan.py --alpha-ds 0.5 0.6 0.7 0.8 0.9 1.0 --alpha-gs 0.9 1.0 1.1 1.2 --num-seeds 200 --epochs 400
    # non-saturating grid point and LSGAN baseline
    python alpha_dual_gan.py --non-saturating --alpha-ds 1.0 0.5 --alpha-gs 1.0 1.2 --lsgan --num-seeds 200 --epochs 400
    # images: DCGAN on CelebA 64×64, non-saturating (0.6, 1), 100 epochs, Inception FID every 10 epochs
    python alpha_dual_gan.py --dataset celeba --non-saturating --alpha-ds 0.6 --lr 5e-4 --inception-weights pt_inception.pth
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
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from common.datasets import Batches, load_dataset, ring_data, to_float
from common.fid import FID, load_digit_classifier

PROB_CLAMP = 1e-7  # the authors' code clamps D's probabilities to [1e-7, 1 − 1e-7] (--clamp-probs)
IMAGE_DEFAULTS = {"celeba": (64, 128), "lsun-classroom": (112, 64), "stacked-mnist": (28, 128), "fake": (32, 64)}


@dataclass
class Args:
    # experiment
    exp_name: str = Path(__file__).stem
    """name of the experiment (part of the run name)"""
    seed: int = 1
    """first seed; a stack holds seeds seed, seed+1, ... (each seed: its own init and batch order)"""
    num_seeds: int = 8
    """seeds per cell (ring: trained at once as one stack; images: one after another). Paper: 200"""
    torch_deterministic: bool = True
    """torch.backends.cudnn.deterministic (same seed, same device → same numbers)"""
    cuda: bool = True
    """use CUDA when available"""
    save_model: bool = False
    """save the stacked (ring) or per-seed (image) G and D weights and optimiser states (ring: at every
    evaluation and at the end, enough for --resume)"""
    resume: bool = False
    """ring: continue the run named by --output-dir/--run-name from its checkpoints (cells already finished are
    reused, an unfinished cell continues from its last saved epoch); raise --epochs to train further"""
    output_dir: str = "runs"
    """folder that receives runs/<run_name>/"""
    run_name: str | None = None
    """override the run folder name (default: {dataset}__{exp_name}__{seed}__{time})"""
    threads: int | None = None
    """torch.set_num_threads (None: leave PyTorch's default / OMP_NUM_THREADS)"""

    # data
    dataset: Literal["ring", "celeba", "lsun-classroom", "stacked-mnist", "fake"] = "ring"
    """ring: the 8-Gaussian ring (no download); images: DCGAN experiments; fake: synthetic images for tests"""
    data_root: str = "data"
    """root of the image datasets (see common/datasets.py for the expected layout)"""
    image_size: int | None = None
    """image side (None: celeba 64, lsun-classroom 112, stacked-mnist 28, fake 32); must be 4·2^k or 7·2^k"""
    num_samples: int | None = None
    """use only the first n training images (quick runs)"""

    # method
    alpha_ds: tuple[float, ...] = (1.0, 0.5)
    """α_D values of the grid (discriminator's α-loss; 1 = log-loss; inf allowed)"""
    alpha_gs: tuple[float, ...] = (1.0,)
    """α_G values of the grid (generator's α-loss)"""
    non_saturating: bool = False
    """non-saturating generator loss E ℓ_αG(1, D(G(z))) instead of the saturating −E ℓ_αG(0, D(G(z)))"""
    lsgan: bool = False
    """also train the LSGAN baseline (0-1 coding on D's raw output) as one more cell"""
    clamp_probs: bool = False
    """authors' α-loss: clamp σ(logit) to [1e-7, 1−1e-7] and use the probability formula (kills gradients
    once D saturates); default is the exact, stable logit form"""

    # optimisation
    epochs: int | None = None
    """training epochs (None: ring 5, a CPU-sized default — the paper's protocol is 400; images 100 as in the paper)"""
    max_steps: int | None = None
    """stop each cell/seed after this many steps (quick runs; None = full epochs)"""
    batch_size: int | None = None
    """batch size (None: ring 128, celeba 128, lsun-classroom 64, stacked-mnist 128)"""
    lr: float | None = None
    """Adam learning rate for G and D (None: ring 1e-4 as in the paper; images 2e-4, the paper sweeps 1e-4..1e-3)"""
    beta1: float = 0.9
    """Adam β1 (paper: 0.9 for both experiments)"""
    beta2: float | None = None
    """Adam β2 (None: ring 0.999, images 0.99 as in the paper)"""
    ring_width_g: int = 400
    """ring generator width (paper: 4 hidden layers of 400)"""
    ring_width_d: int = 200
    """ring discriminator width (paper: 4 hidden layers of 200)"""
    nz: int = 100
    """image noise dimension (DCGAN)"""
    ngf: int = 64
    """DCGAN generator base width"""
    ndf: int = 64
    """DCGAN discriminator base width"""

    # evaluation and logging
    eval_every: int = 50
    """ring: evaluate all seeds every this many epochs (and at the end); 0 = end only"""
    fid_every: int = 10
    """images: FID every this many epochs (and at the end); 0 = end only"""
    fid_extractor: Literal["auto", "inception", "digits"] = "auto"
    """images: auto = inception for celeba/lsun, in-domain digit CNN for stacked-mnist/fake"""
    fid_samples: int = 10_000
    """images: generated and real samples per FID (capped by the real test set size)"""
    inception_weights: str | None = None
    """path of the FID Inception weights (pt_inception-2015-12-05 .pth) where there is no network"""
    log_every: int = 100
    """log losses to TensorBoard every this many steps (one host sync each)"""
    scatter_seeds: int = 8
    """ring: how many seeds to draw in the real-vs-generated scatter figure of each cell"""

    # filled at runtime
    device: str = ""
    """(runtime) device used"""

    def __post_init__(self):
        for name in ("alpha_ds", "alpha_gs"):
            values = getattr(self, name)
            if not values:
                raise SystemExit(f"error: --{name.replace('_', '-')} needs at least one value")
            bad = [a for a in values if not a > 0 or math.isnan(a)]
            if bad:
                raise SystemExit(f"error: α must be in (0, ∞]; got {bad} in --{name.replace('_', '-')}. "
                                 "α = 1 is the log-loss (vanilla GAN), α = inf the total-variation loss")
        positive = {"num_seeds": self.num_seeds, "epochs": self.epochs, "max_steps": self.max_steps,
                    "batch_size": self.batch_size, "lr": self.lr, "ring_width_g": self.ring_width_g,
                    "ring_width_d": self.ring_width_d, "nz": self.nz, "ngf": self.ngf, "ndf": self.ndf,
                    "log_every": self.log_every, "fid_samples": self.fid_samples}
        for name, value in positive.items():
            if value is not None and value <= 0:
                raise SystemExit(f"error: --{name.replace('_', '-')} must be positive, got {value}")
        for name, value in (("beta1", self.beta1), ("beta2", self.beta2)):
            if value is not None and not 0 <= value < 1:
                raise SystemExit(f"error: --{name} must be in [0, 1), got {value}")
        if self.resume and (self.dataset != "ring" or self.run_name is None):
            raise SystemExit("error: --resume continues a ring run: give its --run-name (and --output-dir); "
                             "the image path has no resume")
        if self.eval_every < 0 or self.fid_every < 0:
            raise SystemExit("error: --eval-every and --fid-every must be >= 0 (0 = at the end only)")
        if self.image_size is not None and dcgan_base(self.image_size) is None:
            raise SystemExit(f"error: --image-size {self.image_size} is not 4·2^k or 7·2^k (k >= 1): "
                             "use e.g. 32, 64, 128 (base 4) or 28, 56, 112 (base 7)")


# ---------------------------------------------------------------- α-loss and the objectives

def alpha_loss(logits: torch.Tensor, target: int, alpha: float, clamp_probs: bool = False) -> torch.Tensor:
    """Per-sample α-loss ℓ_α(y, σ(z)) for a constant label y = target ∈ {0, 1}, α ∈ (0, ∞].

    Stable logit form (PAPER_NOTES §001): with c = 1 − 1/α and s = softplus(−z) (y = 1) or softplus(z)
    (y = 0) — i.e. s = −log ŷ_y — ℓ = (1 − e^{−c·s})/c = −expm1(−c·s)/c. c → 0 (α = 1) gives s, the
    log-loss; c = 1 (α = ∞) gives 1 − ŷ_y. For α < 1 the loss grows like e^{|c|·|z|} on wrong logits, which
    is the loss itself, not a rounding problem. clamp_probs=True evaluates the paper's formula on
    σ(z) clamped to [1e-7, 1 − 1e-7], as the authors' code does."""
    if not alpha > 0:
        raise ValueError(f"α must be in (0, ∞], got {alpha}")
    if target not in (0, 1):
        raise ValueError(f"target must be 0 or 1, got {target}")
    if clamp_probs:
        prob = torch.sigmoid(logits).clamp(PROB_CLAMP, 1 - PROB_CLAMP)
        prob_y = prob if target == 1 else 1 - prob
        if alpha == 1:
            return -torch.log(prob_y)
        if math.isinf(alpha):
            return 1 - prob_y
        return alpha / (alpha - 1) * (1 - prob_y ** ((alpha - 1) / alpha))
    neg_log_prob = F.softplus(-logits if target == 1 else logits)  # −log σ(±z), exact for large |z|
    if alpha == 1:
        return neg_log_prob
    c = 1.0 if math.isinf(alpha) else 1 - 1 / alpha
    u = c * neg_log_prob
    # expm1 is exact for small u, but its backward (output + 1) rounds to 0 once e^{−u} < float eps; for u > 1
    # (1 − e^{−u})/c has no cancellation and an exact gradient e^{−u}. The clamps keep the unused branch finite.
    return torch.where(u > 1, (1 - torch.exp(-u.clamp(min=1))) / c, -torch.expm1(-u.clamp(max=1)) / c)


def discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor, alpha_d: float, lsgan: bool = False,
                       clamp_probs: bool = False) -> torch.Tensor:
    """D's loss per stack member (mean over the last dim): −V_αD = E ℓ_αD(1, D(x)) + E ℓ_αD(0, D(G(z)));
    LSGAN (0-1 coding, raw output): ½E(D(x) − 1)² + ½E D(G(z))²."""
    if lsgan:
        return 0.5 * (d_real - 1).square().mean(-1) + 0.5 * d_fake.square().mean(-1)
    return (alpha_loss(d_real, 1, alpha_d, clamp_probs).mean(-1)
            + alpha_loss(d_fake, 0, alpha_d, clamp_probs).mean(-1))


def generator_loss(d_fake: torch.Tensor, alpha_g: float, non_saturating: bool, lsgan: bool = False,
                   clamp_probs: bool = False) -> torch.Tensor:
    """G's loss per stack member: saturating V_αG's fake term −E ℓ_αG(0, D(G(z))); non-saturating
    E ℓ_αG(1, D(G(z))); LSGAN ½E(D(G(z)) − 1)²."""
    if lsgan:
        return 0.5 * (d_fake - 1).square().mean(-1)
    if non_saturating:
        return alpha_loss(d_fake, 1, alpha_g, clamp_probs).mean(-1)
    return -alpha_loss(d_fake, 0, alpha_g, clamp_probs).mean(-1)


def optimal_discriminator(p_real: torch.Tensor, p_fake: torch.Tensor, alpha_d: float) -> torch.Tensor:
    """Theorem 1: the α_D-tilted posterior p_r^α / (p_r^α + p_g^α) = σ(α·(log p_r − log p_g))."""
    if math.isinf(alpha_d):  # α = ∞: the hard decision 1{p_r > p_g} (½ on ties)
        return 0.5 * (1 + torch.sign(p_real - p_fake))
    return torch.sigmoid(alpha_d * (torch.log(p_real) - torch.log(p_fake)))


# ---------------------------------------------------------------- ring: stacked networks, training, metrics

class StackedMLP(nn.Module):
    """S independent MLPs run at once with batched matmuls: input S×B×in → S×B×out. Member s is
    initialised like torch.nn.Linear's default (U(±1/√fan_in) for weight and bias) from `generators[s]`,
    so a seed's weights do not depend on which other seeds share the stack."""

    def __init__(self, sizes: list[int], generators: list[torch.Generator], negative_slope: float = 0.0):
        super().__init__()
        self.negative_slope = negative_slope
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1 / math.sqrt(fan_in)
            w = torch.stack([(torch.rand(fan_in, fan_out, generator=g) * 2 - 1) * bound for g in generators])
            b = torch.stack([(torch.rand(1, fan_out, generator=g) * 2 - 1) * bound for g in generators])
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)  # b + x @ w for every stack member in one call
            if i < last:
                x = F.leaky_relu(x, self.negative_slope) if self.negative_slope else F.relu(x)
        return x


def ring_networks(seeds: list[int], width_g: int = 400, width_d: int = 200,
                  device: torch.device | str = "cpu") -> tuple[StackedMLP, StackedMLP, list]:
    """Stacked ring G (2→400, 3×400, →2, ReLU) and D (2→200, 3×200, →1, LeakyReLU 0.2) on `device`. Each seed's
    init is drawn on the CPU from torch.Generator(seed) (G, then D), so it is the same on every device; the
    returned per-seed generators live on `device` and draw the per-epoch shuffles there (one randperm per seed
    and epoch: cheap on a GPU, where 200 CPU randperms per epoch would cost more than the epoch)."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    gen_net = StackedMLP([2, width_g, width_g, width_g, width_g, 2], gens)
    disc_net = StackedMLP([2, width_d, width_d, width_d, width_d, 1], gens, negative_slope=0.2)
    shuffle_gens = [torch.Generator(device).manual_seed(s) for s in seeds]
    return gen_net.to(device), disc_net.to(device), shuffle_gens


def adam(params, lr: float, betas: tuple[float, float], device: torch.device) -> torch.optim.Adam:
    """Adam is elementwise, so one torch.optim.Adam over stacked parameters is exactly per-seed Adam
    (every seed's loss term reaches only its own slice). Fused on CUDA, foreach (few calls) on CPU."""
    if device.type == "cuda":
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    return torch.optim.Adam(params, lr=lr, betas=betas, foreach=True)


def ring_train_step(gen_net, disc_net, opt_g, opt_d, real, noise, alive, alpha_d, alpha_g, non_saturating,
                    lsgan=False, clamp_probs=False):
    """One strict 1:1 alternation on one fake batch for every stack member: D step on fake.detach(), then
    the G step through the just-updated D. real, noise: S×B×2; alive: S bool. Dead members' losses are
    masked to 0, so a non-finite seed cannot touch the others (they are independent slices anyway).
    Returns the per-seed D and G losses (detached, S) and which seeds stayed finite — no host sync."""
    fake = gen_net(noise)
    d_out = disc_net(torch.cat([real, fake.detach()], 1)).squeeze(-1)
    d_real, d_fake = d_out[:, :real.shape[1]], d_out[:, real.shape[1]:]
    d_loss = discriminator_loss(d_real, d_fake, alpha_d, lsgan, clamp_probs)
    opt_d.zero_grad(set_to_none=True)
    torch.where(alive, d_loss, 0.0).sum().backward()
    opt_d.step()
    disc_net.requires_grad_(False)  # the G step needs gradients through D, not for D's weights
    g_loss = generator_loss(disc_net(fake).squeeze(-1), alpha_g, non_saturating, lsgan, clamp_probs)
    opt_g.zero_grad(set_to_none=True)
    torch.where(alive, g_loss, 0.0).sum().backward()
    disc_net.requires_grad_(True)
    opt_g.step()
    d_loss, g_loss = d_loss.detach(), g_loss.detach()
    return d_loss, g_loss, alive & torch.isfinite(d_loss) & torch.isfinite(g_loss)


@torch.no_grad()
def stacked_generate(gen_net: StackedMLP, noise: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """G_s(noise) for every member s: noise N×2 → S×N×2, in chunks to bound memory."""
    num = len(gen_net.weights[0])
    return torch.cat([gen_net(noise[i:i + chunk].expand(num, -1, -1)) for i in range(0, len(noise), chunk)], 1)


def ring_metrics(samples: torch.Tensor, centers: torch.Tensor, std: float, real_mode_counts: torch.Tensor) -> dict:
    """Metrics of S sample sets (S×N×2). Each sample goes to its nearest mode; a mode is covered when a
    sample assigned to it lies within 3·std; high-quality = share of samples within 3·std of their mode;
    KL(P_real ‖ P_fake) over the modes (natural log) with add-one smoothing on the fake counts. A set with
    a non-finite sample covers 0 modes (hq 0, KL nan)."""
    finite = torch.isfinite(samples).all(-1).all(-1)
    samples = torch.nan_to_num(samples, nan=1e6, posinf=1e6, neginf=-1e6)
    num_modes = len(centers)
    dist, mode = torch.cdist(samples, centers.expand(len(samples), -1, -1)).min(-1)
    close = dist <= 3 * std
    one_hot = F.one_hot(mode, num_modes)
    covered = (one_hot * close.unsqueeze(-1)).sum(1) > 0
    fake_counts = one_hot.sum(1).double()
    p_real = (real_mode_counts.double() / real_mode_counts.sum()).to(samples.device)
    p_fake = (fake_counts + 1) / (fake_counts.sum(-1, keepdim=True) + num_modes)
    terms = torch.where(p_real > 0, p_real * (p_real.log() - p_fake.log()), 0.0)
    kl = terms.sum(-1)
    modes = torch.where(finite, covered.sum(-1), 0)
    return {"modes": modes.cpu(), "hq": torch.where(finite, close.float().mean(-1), 0.0).cpu(),
            "kl": torch.where(finite, kl, float("nan")).cpu(), "finite": finite.cpu()}


def cell_name(alpha_d: float, alpha_g: float, lsgan: bool) -> str:
    if lsgan:
        return "lsgan"
    return "vanilla" if alpha_d == 1 and alpha_g == 1 else f"({alpha_d:g},{alpha_g:g})"


def rate_summary(successes: int, n: int) -> tuple[float, float, float, float]:
    """Rate, binomial standard error and Wilson 95% interval of successes/n."""
    p = successes / n
    z = 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, math.sqrt(p * (1 - p) / n), max(0.0, centre - half), min(1.0, centre + half)


def train_ring_cell(args: Args, alpha_d: float, alpha_g: float, lsgan: bool, ring, device: torch.device,
                    writer: SummaryWriter | None = None, out_dir: Path | None = None, progress: bool = True) -> dict:
    """Train one grid cell (num_seeds stacked seeds) on the ring; returns per-seed metrics and timing."""
    name = cell_name(alpha_d, alpha_g, lsgan)
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    gen_net, disc_net, gens = ring_networks(seeds, args.ring_width_g, args.ring_width_d, device)
    betas = (args.beta1, args.beta2)
    opt_g, opt_d = adam(gen_net.parameters(), args.lr, betas, device), adam(disc_net.parameters(), args.lr, betas, device)
    train, noise = ring.train.to(device), ring.train_noise.to(device)
    real_counts = torch.bincount(torch.cdist(ring.test, ring.centers).argmin(-1), minlength=len(ring.centers))
    steps_per_epoch = math.ceil(len(train) / args.batch_size)  # 391: the last, smaller batch is kept
    total = steps_per_epoch * args.epochs if args.max_steps is None else min(args.max_steps, steps_per_epoch * args.epochs)
    alive = torch.ones(len(seeds), dtype=torch.bool, device=device)
    died_at = torch.full((len(seeds),), -1, dtype=torch.long, device=device)
    history, step, first_epoch = [], 0, 0
    checkpoint_path = None if out_dir is None else out_dir / f"checkpoint_{name}.pt"
    if args.resume and checkpoint_path is not None and checkpoint_path.exists():
        saved = torch.load(checkpoint_path, map_location=device, weights_only=False)
        if saved["seeds"] != seeds or saved["step"] != saved["epoch"] * steps_per_epoch:
            raise SystemExit(f"error: {checkpoint_path} holds seeds {saved['seeds']} at step {saved['step']}; "
                             "resume with the same --seed/--num-seeds from a checkpoint at an epoch boundary")
        gen_net.load_state_dict(saved["generator"])
        disc_net.load_state_dict(saved["discriminator"])
        opt_g.load_state_dict(saved["opt_g"])
        opt_d.load_state_dict(saved["opt_d"])
        for g, state in zip(gens, saved["shuffle_states"]):
            g.set_state(state.cpu())
        alive, died_at = saved["alive"].to(device), saved["died_at"].to(device)
        history, step, first_epoch = saved["history"], saved["step"], saved["epoch"]
        print(f"cell {name}: resumed from {checkpoint_path} at epoch {first_epoch}")

    def save_checkpoint(epoch_done: int):
        if args.save_model and checkpoint_path is not None:
            tmp = checkpoint_path.with_suffix(".tmp")  # write then rename: Ctrl-C never leaves a broken file
            torch.save({"generator": gen_net.state_dict(), "discriminator": disc_net.state_dict(),
                        "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "alive": alive.cpu(),
                        "died_at": died_at.cpu(), "shuffle_states": [g.get_state() for g in gens], "seeds": seeds,
                        "step": step, "epoch": epoch_done, "history": history, "args": asdict(args)}, tmp)
            os.replace(tmp, checkpoint_path)

    start, start_step = time.time(), step
    bar = tqdm(total=total, initial=step, desc=f"cell {name}", disable=not progress, dynamic_ncols=True, mininterval=5)

    def evaluate(epoch_done: float) -> dict:
        metrics = ring_metrics(stacked_generate(gen_net, ring.test_noise.to(device)), ring.centers.to(device),
                               ring.std, real_counts)
        dead = ~alive.cpu()
        metrics["modes"] = torch.where(dead, 0, metrics["modes"])
        metrics["hq"] = torch.where(dead, 0.0, metrics["hq"])
        metrics["kl"] = torch.where(dead, float("nan"), metrics["kl"])
        success, failure = int((metrics["modes"] == 8).sum()), int((metrics["modes"] == 0).sum())
        record = {"epoch": epoch_done, "step": step, "success_rate": success / len(seeds),
                  "failure_rate": failure / len(seeds), "mean_modes": metrics["modes"].float().mean().item(),
                  "mean_hq": metrics["hq"].mean().item(), "median_kl": float(np.nanmedian(metrics["kl"].numpy()))
                  if (~torch.isnan(metrics["kl"])).any() else float("nan"), "alive": int(alive.sum())}
        history.append(record)
        if writer is not None:
            for key in ("success_rate", "failure_rate", "mean_modes", "mean_hq", "median_kl"):
                writer.add_scalar(f"eval/{name}/{key}", record[key], step)
        return metrics

    metrics = None
    try:
        for epoch in range(first_epoch, args.epochs):
            # one permutation per seed per epoch from that seed's own generator (data and noise share it)
            perms = torch.stack([torch.randperm(len(train), generator=g, device=device) for g in gens])
            for k in range(steps_per_epoch):
                if step >= total:
                    break
                idx = perms[:, k * args.batch_size:(k + 1) * args.batch_size]
                d_loss, g_loss, still_alive = ring_train_step(gen_net, disc_net, opt_g, opt_d, train[idx], noise[idx],
                                                              alive, alpha_d, alpha_g, args.non_saturating, lsgan,
                                                              args.clamp_probs)
                died_at = torch.where(alive & ~still_alive, step, died_at)  # a non-finite seed is failed, masked
                alive = still_alive
                step += 1
                bar.update(1)
                if writer is not None and step % args.log_every == 0:
                    n_alive = int(alive.sum())
                    denom = max(n_alive, 1)
                    writer.add_scalar(f"losses/{name}/d_loss", (torch.where(alive, d_loss, 0).sum() / denom).item(), step)
                    writer.add_scalar(f"losses/{name}/g_loss", (torch.where(alive, g_loss, 0).sum() / denom).item(), step)
                    writer.add_scalar(f"charts/{name}/alive_seeds", n_alive, step)
                    writer.add_scalar(f"charts/{name}/seed_steps_per_s",
                                      len(seeds) * (step - start_step) / (time.time() - start), step)
                    bar.set_postfix(alive=n_alive)
            if step >= total:
                break
            if args.eval_every and (epoch + 1) % args.eval_every == 0 and (epoch + 1) < args.epochs:
                evaluate(epoch + 1)
                save_checkpoint(epoch + 1)
    finally:
        bar.close()
    elapsed = time.time() - start
    metrics = evaluate(step / steps_per_epoch)
    died_at = died_at.cpu()
    per_seed = [{"cell": name, "alpha_d": "" if lsgan else alpha_d, "alpha_g": "" if lsgan else alpha_g,
                 "objective": "lsgan" if lsgan else ("non-saturating" if args.non_saturating else "saturating"),
                 "seed": s, "modes": int(metrics["modes"][i]), "hq": float(metrics["hq"][i]),
                 "kl": float(metrics["kl"][i]), "diverged_at_step": int(died_at[i]),
                 "status": ("diverged" if died_at[i] >= 0 else "success" if metrics["modes"][i] == 8
                            else "failure" if metrics["modes"][i] == 0 else "partial")}
                for i, s in enumerate(seeds)]
    if out_dir is not None:
        draw_ring_scatter(ring, stacked_generate(gen_net, ring.test_noise[:2000].to(device)).cpu(), per_seed,
                          args.scatter_seeds, out_dir / f"scatter_{name}.png", writer, f"samples/{name}")
        save_checkpoint(step // steps_per_epoch)
    return {"name": name, "alpha_d": alpha_d, "alpha_g": alpha_g, "lsgan": lsgan, "per_seed": per_seed,
            "history": history, "steps": step, "epochs_done": step / steps_per_epoch, "seconds": elapsed,
            "seed_epochs_per_s": len(seeds) * (step - start_step) / steps_per_epoch / max(elapsed, 1e-9)}


def summarise_cell(cell: dict) -> dict:
    rows, n = cell["per_seed"], len(cell["per_seed"])
    success, failure = sum(r["modes"] == 8 for r in rows), sum(r["modes"] == 0 for r in rows)
    s_rate, s_se, s_lo, s_hi = rate_summary(success, n)
    f_rate, f_se, f_lo, f_hi = rate_summary(failure, n)
    kls = [r["kl"] for r in rows if not math.isnan(r["kl"])]
    return {"cell": cell["name"], "alpha_d": cell["alpha_d"], "alpha_g": cell["alpha_g"], "lsgan": cell["lsgan"],
            "seeds": n, "epochs": round(cell["epochs_done"], 3), "success_rate": s_rate, "success_se": s_se,
            "success_ci95": [s_lo, s_hi], "failure_rate": f_rate, "failure_se": f_se, "failure_ci95": [f_lo, f_hi],
            "mean_modes": float(np.mean([r["modes"] for r in rows])), "std_modes": float(np.std([r["modes"] for r in rows])),
            "mean_hq": float(np.mean([r["hq"] for r in rows])), "median_kl": float(np.median(kls)) if kls else float("nan"),
            "diverged": sum(r["status"] == "diverged" for r in rows), "seconds": round(cell["seconds"], 1),
            "seed_epochs_per_s": cell["seed_epochs_per_s"]}


def grid_tables(summaries: list[dict], alpha_ds, alpha_gs) -> tuple[str, dict[str, list[list]]]:
    """Success and failure tables in the paper's layout (rows α_G, columns α_D, entries in %), as Markdown
    and as CSV rows; an LSGAN cell is listed under the tables."""
    by_cell = {(s["alpha_d"], s["alpha_g"]): s for s in summaries if not s["lsgan"]}
    md, csv_rows = [], {}
    for key, title in (("success_rate", "success (8/8 modes)"), ("failure_rate", "failure (0/8 modes)")):
        header = ["α_G \\ α_D"] + [f"{a:g}" for a in alpha_ds]
        rows = [[f"{g:g}"] + [f"{100 * by_cell[(d, g)][key]:.0f}" for d in alpha_ds] for g in alpha_gs]
        csv_rows[key] = [header] + rows
        md += [f"% of {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    for s in summaries:
        if s["lsgan"]:
            md += [f"LSGAN: success {100 * s['success_rate']:.0f}%, failure {100 * s['failure_rate']:.0f}%", ""]
    return "\n".join(md), csv_rows


def draw_ring_scatter(ring, samples, per_seed, count, path, writer, tag):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    count = min(count, len(samples))
    cols = min(4, count)
    fig, axes = plt.subplots(math.ceil(count / cols), cols, figsize=(2.6 * cols, 2.6 * math.ceil(count / cols)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= count:
            continue
        ax.scatter(ring.test[:2000, 0], ring.test[:2000, 1], s=2, c="tab:blue", alpha=0.5)
        pts = samples[i][torch.isfinite(samples[i]).all(-1)].clamp(-3, 3)
        ax.scatter(pts[:, 0], pts[:, 1], s=2, c="tab:red", alpha=0.5)
        ax.set_xlim(-1.6, 1.6), ax.set_ylim(-1.6, 1.6)
        ax.set_title(f"seed {per_seed[i]['seed']}: {per_seed[i]['modes']}/8", fontsize=8)
    save_figure(fig, path, writer, tag, dpi=80)


def save_figure(fig, path: Path, writer, tag: str, dpi: int = 90) -> None:
    """Write a matplotlib figure as PNG (and to TensorBoard when a writer is given), then close it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    if writer is not None:
        writer.add_figure(tag, fig)
    plt.close(fig)


def draw_grid_plots(summaries, alpha_ds, alpha_gs, out_dir: Path, writer) -> list[str]:
    """Heatmaps of the success/failure grid and the α_D sweep at α_G = 1 (when it has ≥ 2 points)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    by_cell = {(s["alpha_d"], s["alpha_g"]): s for s in summaries if not s["lsgan"]}
    fig, axes = plt.subplots(1, 2, figsize=(1.2 * len(alpha_ds) + 4, 0.7 * len(alpha_gs) + 2.2))
    for ax, key, cmap in ((axes[0], "success_rate", "Greens"), (axes[1], "failure_rate", "Reds")):
        grid = np.array([[100 * by_cell[(d, g)][key] for d in alpha_ds] for g in alpha_gs])
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=100, origin="upper")
        ax.set_xticks(range(len(alpha_ds)), [f"{a:g}" for a in alpha_ds])
        ax.set_yticks(range(len(alpha_gs)), [f"{a:g}" for a in alpha_gs])
        ax.set_xlabel("α_D"), ax.set_ylabel("α_G"), ax.set_title(f"{key.split('_')[0]} % ({summaries[0]['seeds']} seeds)")
        for (r, c), v in np.ndenumerate(grid):
            ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=9)
    save_figure(fig, out_dir / "grid_heatmap.png", writer, "charts/grid_heatmap")
    written.append("grid_heatmap.png")
    sweep = sorted(d for d in alpha_ds if (d, 1.0) in by_cell)
    if len(sweep) >= 2:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for key, colour in (("success", "tab:green"), ("failure", "tab:red")):
            rates = np.array([100 * by_cell[(d, 1.0)][f"{key}_rate"] for d in sweep])
            ci = np.array([[100 * x for x in by_cell[(d, 1.0)][f"{key}_ci95"]] for d in sweep])
            ax.errorbar(sweep, rates, yerr=[rates - ci[:, 0], ci[:, 1] - rates], marker="o", color=colour,
                        capsize=3, label=f"{key} (95% Wilson)")
            for s in summaries:
                if s["lsgan"]:
                    ax.axhline(100 * s[f"{key}_rate"], color=colour, ls="--", lw=1, label=f"LSGAN {key}")
        ax.set_xlabel("α_D (α_G = 1)"), ax.set_ylabel("% of seeds"), ax.set_ylim(-2, 102), ax.legend(fontsize=7)
        save_figure(fig, out_dir / "alpha_d_sweep.png", writer, "charts/alpha_d_sweep")
        written.append("alpha_d_sweep.png")
    return written


# ---------------------------------------------------------------- images: DCGAN

def dcgan_base(size: int) -> int | None:
    """4 or 7 when size = base·2^k with k ≥ 1 (64 = 4·16, 112 = 7·16, 28 = 7·4), else None."""
    for base in (4, 7):
        if size % base == 0 and size // base >= 2 and (size // base) & (size // base - 1) == 0:
            return base
    return None


def dcgan(image_size: int, channels: int, nz: int = 100, ngf: int = 64, ndf: int = 64) -> tuple[nn.Module, nn.Module]:
    """DCGAN pair. G: ConvT(nz→·, base×base) then 4×4 stride-2 upsamplings with BN+ReLU, Tanh out. D: 4×4
    stride-2 convs with LeakyReLU 0.2 (no BN on the first), a base×base conv to one logit. base = 7 gives the
    7×7 first (G) / last (D) kernels of the 112×112 LSUN model."""
    base = dcgan_base(image_size)
    ups = int(math.log2(image_size // base))
    widths = [ngf * 2 ** i for i in reversed(range(ups))]  # e.g. 512, 256, 128, 64 for 64×64
    g_layers = [nn.ConvTranspose2d(nz, widths[0], base, 1, 0, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(True)]
    for w_in, w_out in zip(widths[:-1], widths[1:]):
        g_layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), nn.ReLU(True)]
    g_layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1, bias=False), nn.Tanh()]
    d_widths = [ndf * 2 ** i for i in range(ups)]
    d_layers = [nn.Conv2d(channels, d_widths[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
    for w_in, w_out in zip(d_widths[:-1], d_widths[1:]):
        d_layers += [nn.Conv2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), nn.LeakyReLU(0.2, True)]
    d_layers += [nn.Conv2d(d_widths[-1], 1, base, 1, 0, bias=False), nn.Flatten(0)]
    gen_net, disc_net = nn.Sequential(nn.Unflatten(1, (nz, 1, 1)), *g_layers), nn.Sequential(*d_layers)
    for module in [*gen_net.modules(), *disc_net.modules()]:  # DCGAN init: N(0, 0.02) convs, BN weight N(1, 0.02)
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)
    return gen_net, disc_net


def train_image_seed(args: Args, seed: int, real: torch.Tensor, fid: FID | None, fid_noise: torch.Tensor,
                     classifier, lsgan: bool, alpha_d: float, alpha_g: float, device, writer, out_dir: Path) -> dict:
    """Train one DCGAN seed on images (float [-1, 1] on the device); FID every fid_every epochs."""
    torch.manual_seed(seed)
    gen_net, disc_net = dcgan(real.shape[-1], real.shape[1], args.nz, args.ngf, args.ndf)
    gen_net, disc_net = gen_net.to(device), disc_net.to(device)
    betas = (args.beta1, args.beta2)
    opt_g, opt_d = adam(gen_net.parameters(), args.lr, betas, device), adam(disc_net.parameters(), args.lr, betas, device)
    batches = Batches(real, batch_size=args.batch_size, generator=torch.Generator(real.device).manual_seed(seed))
    noise_gen = torch.Generator(device).manual_seed(seed)
    total = batches.steps_per_epoch * args.epochs if args.max_steps is None else args.max_steps
    name = f"{cell_name(alpha_d, alpha_g, lsgan)}/seed{seed}"
    curve, status, start = [], "ok", time.time()

    def score(epoch):
        entry = {"epoch": epoch}
        if fid is not None:
            entry["fid"] = fid.score_generator(gen_net, fid_noise)
            writer.add_scalar(f"eval/{name}/fid", entry["fid"], step)
        if classifier is not None:  # mode count (Stacked MNIST: 1,000 modes)
            with torch.no_grad():
                gen_net.eval()
                labels = torch.cat([classifier.predict(gen_net(fid_noise[i:i + 500])) for i in range(0, len(fid_noise), 500)])
                gen_net.train()
            counts = torch.bincount(labels.cpu(), minlength=classifier.num_classes).double()
            p = counts / counts.sum()
            entry["modes"] = int((counts > 0).sum())
            entry["kl_uniform"] = float((p[p > 0] * (p[p > 0] * len(p)).log()).sum())
            writer.add_scalar(f"eval/{name}/modes", entry["modes"], step)
        curve.append(entry)

    step = 0
    for step in tqdm(range(1, total + 1), desc=name, dynamic_ncols=True, mininterval=5):
        (x,) = batches.next()
        z = torch.randn(len(x), args.nz, device=device, generator=noise_gen)
        fake = gen_net(z)
        d_loss = discriminator_loss(disc_net(x), disc_net(fake.detach()), alpha_d, lsgan, args.clamp_probs)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_loss = generator_loss(disc_net(fake), alpha_g, args.non_saturating, lsgan, args.clamp_probs)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        if step % args.log_every == 0 or step == total:
            d_val, g_val = d_loss.item(), g_loss.item()
            if not (math.isfinite(d_val) and math.isfinite(g_val)):
                status = f"diverged at step {step}"
                print(f"{name}: non-finite loss at step {step}; the seed is recorded as diverged")
                break
            writer.add_scalar(f"losses/{name}/d_loss", d_val, step)
            writer.add_scalar(f"losses/{name}/g_loss", g_val, step)
            writer.add_scalar("charts/steps_per_s", step / (time.time() - start), step)
        if args.fid_every and step % (args.fid_every * batches.steps_per_epoch) == 0 and step < total:
            score(step / batches.steps_per_epoch)
    if status == "ok":
        score(step / batches.steps_per_epoch)
    with torch.no_grad():
        gen_net.eval()
        samples = gen_net(fid_noise[:8]).cpu()
    if args.save_model:
        torch.save({"generator": gen_net.state_dict(), "discriminator": disc_net.state_dict(), "opt_g": opt_g.state_dict(),
                    "opt_d": opt_d.state_dict(), "step": step, "batches": batches.state_dict()},
                   out_dir / f"checkpoint_{name.replace('/', '_')}.pt")
    return {"cell": cell_name(alpha_d, alpha_g, lsgan), "seed": seed, "status": status, "steps": step,
            "curve": curve, "samples": samples, "seconds": time.time() - start}


if __name__ == "__main__":
    args = tyro.cli(Args)
    is_ring = args.dataset == "ring"
    if args.epochs is None:
        args.epochs = 5 if is_ring else 100
    if is_ring:
        args.batch_size, args.lr, args.beta2 = args.batch_size or 128, args.lr or 1e-4, args.beta2 or 0.999
    else:
        size_default, batch_default = IMAGE_DEFAULTS[args.dataset]
        args.image_size = args.image_size or size_default
        args.batch_size, args.lr, args.beta2 = args.batch_size or batch_default, args.lr or 2e-4, args.beta2 or 0.99
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    args.device = str(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    run_name = args.run_name or f"{args.dataset}__{args.exp_name}__{args.seed}__{int(time.time())}"
    out_dir = Path(args.output_dir) / run_name
    if args.resume and not list(out_dir.glob("checkpoint_*.pt")):
        raise SystemExit(f"error: --resume found no checkpoint_*.pt in {out_dir}: the run must have used --save-model")
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(out_dir))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    cells = [(d, g, False) for g in args.alpha_gs for d in args.alpha_ds] + ([(1.0, 1.0, True)] if args.lsgan else [])
    objective = "non-saturating" if args.non_saturating else "saturating"
    print(f"run: {out_dir}  device: {device}  cells: {len(cells)} ({objective})  seeds/cell: {args.num_seeds}")
    results, interrupted, wall = [], False, time.time()

    if is_ring:
        ring = ring_data()
        try:
            for alpha_d, alpha_g, lsgan in cells:
                results.append(train_ring_cell(args, alpha_d, alpha_g, lsgan, ring, device, writer, out_dir))
                s = summarise_cell(results[-1])
                print(f"{s['cell']}: success {100 * s['success_rate']:.0f}% ± {100 * s['success_se']:.0f}  "
                      f"failure {100 * s['failure_rate']:.0f}% ± {100 * s['failure_se']:.0f}  mean modes "
                      f"{s['mean_modes']:.2f}  diverged {s['diverged']}  ({s['seed_epochs_per_s']:.3f} seed-epochs/s)")
        except KeyboardInterrupt:
            interrupted = True
            print("interrupted: writing the tables of the finished cells")
        summaries = [summarise_cell(c) for c in results]
        with open(out_dir / "per_seed.csv", "w", newline="") as f:
            fields = list(results[0]["per_seed"][0]) if results else ["cell"]
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for c in results:
                w.writerows(c["per_seed"])
        md_tables, figures = "", []
        grid_done = all(any(s["alpha_d"] == d and s["alpha_g"] == g and not s["lsgan"] for s in summaries)
                        for d, g, lsgan in cells if not lsgan)
        if summaries and grid_done:
            md_tables, csv_rows = grid_tables(summaries, args.alpha_ds, args.alpha_gs)
            for key, rows in csv_rows.items():
                with open(out_dir / f"grid_{key}.csv", "w", newline="") as f:
                    csv.writer(f).writerows(rows)
            (out_dir / "grid_tables.md").write_text(md_tables)
            figures = draw_grid_plots(summaries, args.alpha_ds, args.alpha_gs, out_dir, writer)
        result = {"experiment": "ring", "objective": objective, "interrupted": interrupted, "cells": summaries,
                  "history": {c["name"]: c["history"] for c in results}, "figures": figures,
                  "wall_seconds": time.time() - wall, "args": asdict(args)}
        lines = [f"# (α_D, α_G)-GAN on the 2-D ring ({objective})", "",
                 f"{args.num_seeds} seeds per cell, {args.epochs} epochs (max_steps {args.max_steps}), device {device}", "",
                 "| cell | α_D | α_G | seeds | success % (95% CI) | failure % (95% CI) | mean modes | mean HQ | median KL | diverged |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for s in summaries:
            lines.append(f"| {s['cell']} | {'' if s['lsgan'] else s['alpha_d']} | {'' if s['lsgan'] else s['alpha_g']} | "
                         f"{s['seeds']} | {100 * s['success_rate']:.0f} ({100 * s['success_ci95'][0]:.0f}–"
                         f"{100 * s['success_ci95'][1]:.0f}) | {100 * s['failure_rate']:.0f} ({100 * s['failure_ci95'][0]:.0f}–"
                         f"{100 * s['failure_ci95'][1]:.0f}) | {s['mean_modes']:.2f} | {s['mean_hq']:.3f} | "
                         f"{s['median_kl']:.3f} | {s['diverged']} |")
        lines += ["", md_tables]
    else:
        train_data = load_dataset(args.dataset, "train", args.image_size, args.data_root, num_samples=args.num_samples,
                                  **({"channels": 3} if args.dataset == "fake" else {}))
        test_data = load_dataset(args.dataset, "test", args.image_size, args.data_root,
                                 **({"channels": 3} if args.dataset == "fake" else {}))
        real = to_float(train_data.x.to(device))
        extractor = args.fid_extractor if args.fid_extractor != "auto" else (
            "digits" if args.dataset in ("stacked-mnist", "fake") else "inception")
        fid = FID(test_data.x, extractor=extractor, num_samples=min(args.fid_samples, len(test_data)),
                  root=args.data_root, inception_weights=args.inception_weights, device=device, dataset=args.dataset)
        classifier = fid.classifier if extractor == "digits" else (  # counts modes (Stacked MNIST: 1,000)
            load_digit_classifier(args.dataset, args.data_root, device) if args.dataset in ("stacked-mnist", "fake")
            else None)
        fid_noise = torch.randn(fid.num_real, args.nz, generator=torch.Generator().manual_seed(10_000)).to(device)
        try:
            for alpha_d, alpha_g, lsgan in cells:
                for seed in range(args.seed, args.seed + args.num_seeds):
                    results.append(train_image_seed(args, seed, real, fid, fid_noise, classifier, lsgan, alpha_d,
                                                    alpha_g, device, writer, out_dir))
        except KeyboardInterrupt:
            interrupted = True
            print("interrupted: writing the results of the finished seeds")
        lines = [f"# (α_D, α_G)-GAN, DCGAN on {args.dataset} {args.image_size}×{args.image_size} ({objective})", "",
                 f"{fid.name}; lr {args.lr}, Adam betas ({args.beta1}, {args.beta2}), batch {args.batch_size}", "",
                 "| cell | seed | status | steps | final FID | modes |", "|---|---|---|---|---|---|"]
        for r in results:
            last = r["curve"][-1] if r["curve"] else {}
            lines.append(f"| {r['cell']} | {r['seed']} | {r['status']} | {r['steps']} | "
                         f"{last.get('fid', float('nan')):.2f} | {last.get('modes', '')} |")
        if results:  # one row of samples per seed (the paper's "samples across seeds" figure)
            grid = make_grid(torch.cat([r["samples"] for r in results]), nrow=8, normalize=True, value_range=(-1, 1))
            save_image(grid, out_dir / "samples_across_seeds.png")
            writer.add_image("samples/across_seeds", grid)
        result = {"experiment": args.dataset, "objective": objective, "interrupted": interrupted, "fid_name": fid.name,
                  "runs": [{k: v for k, v in r.items() if k != "samples"} for r in results],
                  "wall_seconds": time.time() - wall, "args": asdict(args)}
    with open(out_dir / "results.json", "w") as f:
        json.dump(result, f, indent=2, default=float)
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    writer.close()
    print(f"results: {out_dir / 'results.md'}")
    if interrupted:
        raise SystemExit(130)
