"""SQD: measuring GAN training stability (S), visual quality (Q) and mode diversity (D) in real time.

Paper: "Measuring GAN Training in Real Time" (anonymous, ICLR 2021 submission; OpenReview), the SQD framework.

Three numbers, cheap enough to compute every epoch. S (eqs. 4–5) is the angle between consecutive snapshots of
all generator weights flattened into one vector (and separately of the discriminator's): it shrinks towards 0 while
training settles and jumps when the networks change direction. Q (eq. 6) is the mean probability, given by a
quality model, that a generated sample is "good" (MTCNN face probability in the paper; classifier confidence for
digits; the fraction of points within 3 std of a centre for the 2-D ring). D (eqs. 7–9) assigns each generated
sample to its nearest mode (a face identity, a digit class, a ring centre) and takes the James–Stein shrinkage
entropy of the assignments (Hausser & Strimmer, 2009): ln m when all m modes are equally represented, 0 when
the generator has collapsed onto one mode. `SQDMonitor` below is self-contained: copy it (with `angle_between`,
`james_stein_entropy`) and call it with a quality model, a mode model, fresh samples and the parameters of G and D.
The paper's finding: NSGAN, LSGAN, Hinge and WGAN without gradient penalty show a "turning point" where S jumps
and Q and D fall; with GP training stays smooth (Table 2: mean Q and D over the last 50 of 300 epochs).

    # the paper's comparison on Stacked MNIST (1,000 modes): 4 losses with and without GP, Table 2 + figures
    python sqd_monitor.py --dataset stacked-mnist --losses nsgan lsgan hinge wgan --regularizers none gp
    # NSGAN with every regulariser of Table 3 (Fig. 7), λ = 10
    python sqd_monitor.py --dataset mnist --losses nsgan --regularizers none gp dragan zero-gp lipschitz
    # CelebA faces as in the paper (needs facenet-pytorch and face-embedding weights, see docs/sqd_monitor.md)
    python sqd_monitor.py --dataset celeba --face-embedding-weights 20180402-114759-vggface2.pt
    # CPU quick run: 28×28 MNIST, small networks, 8 pairs in one process
    python sqd_monitor.py --dataset mnist --image-size 28 --width 16 --num-train 12800 --epochs 10 \\
        --losses nsgan lsgan hinge wgan --regularizers none gp
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
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common.datasets import Batches, load_dataset, ring_data, to_float
from common.fid import load_digit_classifier

LossName = Literal["nsgan", "lsgan", "hinge", "wgan"]
RegName = Literal["none", "gp", "dragan", "zero-gp", "lipschitz"]


@dataclass
class Args:
    # experiment
    exp_name: str = Path(__file__).stem
    """name of the experiment (part of the run name)"""
    seed: int = 1
    """seed of weights, batch order, noise and the monitor's fixed samples (every pair starts from the same G, D)"""
    torch_deterministic: bool = True
    """torch.backends.cudnn.deterministic"""
    cuda: bool = True
    """use CUDA when available"""
    threads: int | None = None
    """torch CPU threads (None: torch's default)"""
    output_dir: str = "runs"
    """folder that receives {run_name}/"""
    run_name: str | None = None
    """override the run name (default {dataset}__{exp_name}__{seed}__{unix time})"""
    save_model: bool = False
    """save a checkpoint per pair at every epoch end (G, D, optimisers, data order, RNG, monitor, history)"""
    resume: str | None = None
    """run folder written with --save-model: finished pairs are kept, unfinished ones continue from their checkpoint"""
    # data
    dataset: Literal["mnist", "stacked-mnist", "celeba", "ring", "fake"] = "mnist"
    """training data; it also picks the quality and mode models (digit classifier / ring centres / MTCNN + faces)"""
    data_root: str = "data"
    """root of the datasets (and of the cached digit classifier and face-identity centres)"""
    image_size: int | None = None
    """image side (None: 64, DCGAN; 28 or 32 make CPU runs feasible for digits); must be b·2^k with 3 ≤ b ≤ 7"""
    num_train: int | None = None
    """keep only the first n training samples (an epoch is one pass over them)"""
    # method
    losses: tuple[LossName, ...] = ("nsgan", "lsgan", "hinge", "wgan")
    """GAN losses (Table 1); every loss is run with every regulariser"""
    regularizers: tuple[RegName, ...] = ("none", "gp")
    """discriminator regularisers (Table 3): none, gp, dragan, zero-gp, lipschitz"""
    lam: float = 10.0
    """regularisation weight λ (the paper: 10, and 100 in Fig. 7a)"""
    dragan_c: float = 0.1
    """DRAGAN perturbation variance c, δ ~ N(0, cI) (not given by the paper; std ≈ 0.32 on [-1, 1] images)"""
    epochs: int = 300
    """training epochs per pair (the paper: 300)"""
    batch_size: int = 128
    """batch size (DCGAN)"""
    lr: float = 2e-4
    """Adam learning rate of G and D (DCGAN)"""
    beta1: float = 0.5
    """Adam β1 (DCGAN)"""
    beta2: float = 0.999
    """Adam β2 (DCGAN)"""
    z_dim: int = 100
    """latent size"""
    width: int = 64
    """channels of D's first / G's last conv layer (DCGAN: 64); hidden units of the ring MLPs"""
    d_norm: Literal["layer", "batch", "none"] = "layer"
    """normalisation in D: layer (same D for every pair; penalties stay per-sample), batch (DCGAN), none"""
    n_critic: int = 1
    """D steps per G step"""
    weight_clip: float | None = None
    """clip D's weights to [-c, c] after each D step (the original WGAN: 0.01); off, the paper does not mention it"""
    # monitor
    num_quality: int = 1000
    """generated samples for Q (the paper: 1,000)"""
    num_diversity: int = 2000
    """generated samples for D (the paper: 2,000)"""
    monitor_every: int = 0
    """also monitor every k iterations (0: once per epoch only); written to sqd_iterations.csv and TensorBoard"""
    jump_factor: float = 3.0
    """turning point: S (of G or D) at least this multiple of its median over the previous `tp_window` epochs"""
    drop_fraction: float = 0.1
    """turning point: Q or D falls by at least this fraction below its previous median within `tp_horizon` epochs"""
    tp_window: int = 5
    """epochs of history the turning-point rule compares with"""
    tp_horizon: int = 2
    """epochs after the jump in which the Q or D drop must appear"""
    table_window: int = 50
    """Table 2 averages the last 50 epochs (of 300); shorter runs average their last sixth"""
    face_embedding_weights: str | None = None
    """celeba: state dict of facenet-pytorch's InceptionResnetV1 (e.g. 20180402-114759-vggface2.pt) for identities"""
    identity_images: int | None = None
    """celeba: images used to build the per-identity embedding centres (None: all)"""
    # logging / performance
    log_every: int = 50
    """iterations between scalar logs and the non-finite-loss check"""
    num_grid: int = 64
    """samples in the saved grids"""
    sample_every: int = 1
    """epochs between saved sample grids (ring: scatter plots); the first and last epochs are always saved"""

    def __post_init__(self):
        def fail(message):
            raise SystemExit(f"error: {message}")
        for name in ("epochs", "batch_size", "z_dim", "width", "n_critic", "num_quality", "num_diversity",
                     "tp_window", "tp_horizon", "table_window", "log_every", "num_grid", "sample_every"):
            if getattr(self, name) <= 0:
                fail(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            fail(f"--lr must be positive, got {self.lr}")
        if self.lam < 0 or self.dragan_c <= 0:
            fail(f"--lam must be ≥ 0 and --dragan-c > 0, got {self.lam} and {self.dragan_c}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            fail(f"Adam betas must lie in [0, 1), got {self.beta1}, {self.beta2}")
        if self.monitor_every < 0 or self.jump_factor <= 1 or not 0 < self.drop_fraction < 1:
            fail("--monitor-every must be ≥ 0, --jump-factor > 1 and --drop-fraction in (0, 1)")
        if self.weight_clip is not None and self.weight_clip <= 0:
            fail(f"--weight-clip must be positive, got {self.weight_clip}")
        if not self.losses or not self.regularizers:
            fail("give at least one loss (--losses) and one regulariser (--regularizers)")
        if self.num_train is not None and self.num_train < self.batch_size:
            fail(f"--num-train {self.num_train} is smaller than one batch ({self.batch_size})")
        if self.dataset != "ring":
            self.image_size = 64 if self.image_size is None else self.image_size
            base_size(self.image_size)  # fails with a message on a size the DCGAN stack cannot build
        if self.resume is not None and not Path(self.resume).is_dir():
            fail(f"--resume '{self.resume}' is not a run folder: pass runs/<run_name> of a run saved with --save-model")


# ---------------------------------------------------------------- the SQD monitor (copy this part)

def angle_between(u: torch.Tensor, v: torch.Tensor) -> float:
    """Eq. (4): arccos(<u, v> / (|u| |v|)) in radians. Computed as 2·atan2(|û − v̂|, |û + v̂|) in float64, the
    same angle without arccos's loss of precision near 0 (consecutive snapshots are often < 1e-3 apart)."""
    u, v = u.double().flatten(), v.double().flatten()
    u_hat, v_hat = u / u.norm(), v / v.norm()
    return float(2 * torch.atan2((u_hat - v_hat).norm(), (u_hat + v_hat).norm()))


def james_stein_probs(counts: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Hausser & Strimmer (2009) shrinkage of the frequencies u_j = count_j / n towards uniform 1/m:
    λ = (1 − Σ u²) / ((n − 1) Σ (1/m − u)²) clipped to [0, 1] (λ = 1 if the denominator is 0 or n ≤ 1);
    p̂ = λ/m + (1 − λ) u. Returns (p̂, λ)."""
    counts = counts.double().flatten()
    n, m = float(counts.sum()), len(counts)
    u = counts / max(n, 1.0)
    denominator = (n - 1) * float(((1.0 / m - u) ** 2).sum())
    lam = 1.0 if n <= 1 or denominator == 0 else min(1.0, max(0.0, (1 - float((u ** 2).sum())) / denominator))
    return lam / m + (1 - lam) * u, lam


def james_stein_entropy(counts: torch.Tensor) -> float:
    """Eq. (9) with the James–Stein estimator: −Σ p̂ ln p̂ (natural log; at most ln m)."""
    p, _ = james_stein_probs(counts)
    p = p[p > 0]
    return 0.0 - float((p * p.log()).sum())  # 0.0 − x: no "-0.0" for a collapsed generator


def nearest_mode(features: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Eq. (8): index of the nearest centre (Euclidean) for each row of `features`."""
    return torch.cdist(features.float(), centres.float().to(features.device)).argmin(1)


class SQDMonitor:
    """Training stability, visual quality and mode diversity in one call.

        monitor = SQDMonitor(quality_model, mode_model, num_modes=10)
        stats = monitor(samples, G=generator.parameters(), D=discriminator.parameters())
        # {"S_G": angle since the previous call (nan on the first), "S_D": ..., "Q": ..., "D": ..., "modes": ...}

    quality_model(samples) -> per-sample probability in [0, 1]; mode_model(samples) -> int64 mode index in
    [0, num_modes). Q uses the first `num_quality` samples, D the first `num_diversity`."""

    def __init__(self, quality_model: Callable, mode_model: Callable, num_modes: int, num_quality: int = 1000,
                 num_diversity: int = 2000):
        self.quality_model, self.mode_model, self.num_modes = quality_model, mode_model, num_modes
        self.num_quality, self.num_diversity = num_quality, num_diversity
        self.snapshots: dict[str, torch.Tensor] = {}

    def stability(self, **named_params) -> dict[str, float]:
        """Eq. (5): angle between each network's flattened weights now and at the previous call."""
        out = {}
        for name, params in named_params.items():
            flat = torch.cat([p.detach().reshape(-1) for p in params]).clone()
            previous = self.snapshots.get(name)
            out[f"S_{name}"] = math.nan if previous is None else angle_between(previous, flat)
            self.snapshots[name] = flat
        return out

    @torch.no_grad()
    def quality(self, samples: torch.Tensor) -> float:
        """Eq. (6): mean quality probability."""
        return float(self.quality_model(samples[:self.num_quality]).float().mean())

    @torch.no_grad()
    def diversity(self, samples: torch.Tensor) -> tuple[float, int]:
        """Eqs. (8)–(9): James–Stein entropy of the nearest-mode assignments, and the number of modes hit."""
        modes = self.mode_model(samples[:self.num_diversity]).long().cpu()
        counts = torch.bincount(modes, minlength=self.num_modes)
        return james_stein_entropy(counts), int((counts > 0).sum())

    def __call__(self, samples: torch.Tensor, **named_params) -> dict[str, float]:
        stats = self.stability(**named_params)
        stats["Q"] = self.quality(samples)
        stats["D"], stats["modes"] = self.diversity(samples)
        return stats

    def state_dict(self) -> dict:
        return {"snapshots": {k: v.cpu() for k, v in self.snapshots.items()}}

    def load_state_dict(self, state: dict, device="cpu") -> None:
        self.snapshots = {k: v.to(device) for k, v in state["snapshots"].items()}


def find_turning_point(s_g: list[float], s_d: list[float], q: list[float], d: list[float], jump_factor: float = 3.0,
                       drop_fraction: float = 0.1, window: int = 5, horizon: int = 2) -> int | None:
    """First epoch t (index into the lists) where S jumps and Q or D drops:
    S_G[t] or S_D[t] ≥ jump_factor · median of that network's S over epochs t−window … t−1, and
    min(Q[t … t+horizon]) ≤ (1 − drop_fraction) · median Q[t−window … t−1] (or the same for D).
    Needs `window` finite previous values. None when no epoch qualifies."""
    def median(values):
        finite = [x for x in values if math.isfinite(x)]
        return float(np.median(finite)) if len(finite) == window else math.nan

    for t in range(window, len(q)):
        jump = any(math.isfinite(s[t]) and s[t] >= jump_factor * median(s[t - window:t]) for s in (s_g, s_d))
        drop = any(min(x[t:t + horizon + 1]) <= (1 - drop_fraction) * median(x[t - window:t]) for x in (q, d))
        if jump and drop:
            return t
    return None


# ---------------------------------------------------------------- quality and mode models

def digit_models(dataset: str, root: str, device) -> tuple[Callable, Callable, int, str]:
    """Q = classifier confidence (max softmax probability), mode = predicted class (10, or 1,000 for stacked)."""
    classifier = load_digit_classifier(dataset, root, device)
    return (lambda x: classifier.probs(x).max(1).values, lambda x: classifier.predict(x), classifier.num_classes,
            f"{classifier.name} (test accuracy {classifier.test_accuracy:.4f}): Q = max softmax, modes = classes")


def ring_quality(points: torch.Tensor, centres: torch.Tensor, std: float, k: float = 3.0) -> torch.Tensor:
    """1 for a point within k·std of its nearest centre (a high-quality sample), else 0."""
    return (torch.cdist(points.float(), centres.to(points.device)).min(1).values <= k * std).float()


def face_models(root: str, weights: str | None, device,
                identity_images: int | None) -> tuple[Callable, Callable, int, str]:
    """The paper's models for faces: MTCNN face probability for Q (top box, 0 when no face; the weights ship inside
    facenet-pytorch) and the nearest CelebA identity centre in a face-embedding space for D."""
    try:
        from facenet_pytorch import MTCNN, InceptionResnetV1
    except ImportError as e:
        raise SystemExit(f"error: face quality/identity models need facenet-pytorch ({e}): `pip install --no-deps "
                         "facenet-pytorch requests` (--no-deps: it pins an old torch; only MTCNN and "
                         "InceptionResnetV1 are used)") from None
    if weights is None or not Path(weights).is_file():
        raise SystemExit(f"error: the face-identity embedding needs weights (--face-embedding-weights, got {weights}). "
                         "Download https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/"
                         "20180402-114759-vggface2.pt and pass its path")
    mtcnn = MTCNN(device=device, select_largest=False)
    embed = InceptionResnetV1(pretrained=None, device=device).eval()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    embed.load_state_dict({k: v for k, v in state.items() if not k.startswith("logits.")}, strict=True)

    def to_faces(x):  # generated [-1, 1] images → 160×160 uint8 HWC for MTCNN, [-1, 1] for the embedding
        return F.interpolate(x.float(), size=(160, 160), mode="bilinear", align_corners=False).clamp(-1, 1)

    @torch.no_grad()
    def embedding(x, batch=256):
        return torch.cat([embed(to_faces(x[i:i + batch].to(device))) for i in range(0, len(x), batch)])

    cache = Path(root) / "sqd" / f"celeba_identity_centres_{identity_images or 'all'}.pt"
    if cache.exists():
        centres = torch.load(cache, weights_only=True)
    else:  # eq. (7): mean embedding of each identity's training images
        data = load_dataset("celeba", "train", image_size=64, root=root, num_samples=identity_images)
        features = torch.cat([embedding(to_float(data.x[i:i + 1024])).cpu() for i in range(0, len(data), 1024)])
        _, ids = torch.unique(data.y, return_inverse=True)  # identities present (a subset may skip some)
        sums = torch.zeros(int(ids.max()) + 1, features.shape[1]).index_add_(0, ids, features)
        centres = sums / torch.bincount(ids).clamp(min=1)[:, None].float()
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(centres, cache)

    @torch.no_grad()
    def quality(x):
        images = ((to_faces(x) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        _, probs = mtcnn.detect(images)
        return torch.tensor([max((p for p in ps if p is not None), default=0.0) for ps in probs])

    return (quality, lambda x: nearest_mode(embedding(x), centres.to(device)), len(centres),
            f"MTCNN face probability (Q); InceptionResnetV1 ({Path(weights).name}) nearest of {len(centres)} "
            "CelebA identity centres (D)")


# ---------------------------------------------------------------- networks

def base_size(size: int) -> int:
    """Side b of G's first feature map: size = b·2^k with 3 ≤ b ≤ 7 (64 → 4, 32 → 4, 28 → 7)."""
    b = size
    while b > 7 and b % 2 == 0:
        b //= 2
    if not 3 <= b <= 7 or b == size:
        raise SystemExit(f"error: image size {size} is not b·2^k with 3 ≤ b ≤ 7 and k ≥ 1: use 28, 32 or 64")
    return b


class Generator(nn.Module):
    """DCGAN generator: z → b×b×(w·2^(k−1)) → … → size×size×channels (stride-2 transposed convs, BN, ReLU,
    tanh)."""

    def __init__(self, z_dim: int, width: int, channels: int, size: int):
        super().__init__()
        b = base_size(size)
        k = int(math.log2(size // b))
        layers = [nn.ConvTranspose2d(z_dim, width * 2 ** (k - 1), b, 1, 0, bias=False),
                  nn.BatchNorm2d(width * 2 ** (k - 1)), nn.ReLU(True)]
        for i in range(k - 1, 0, -1):
            layers += [nn.ConvTranspose2d(width * 2 ** i, width * 2 ** (i - 1), 4, 2, 1, bias=False),
                       nn.BatchNorm2d(width * 2 ** (i - 1)), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    """DCGAN discriminator mirrored from G, leaky ReLU 0.2, one raw score (the losses apply any sigmoid)."""

    def __init__(self, width: int, channels: int, size: int, norm: str):
        super().__init__()
        b = base_size(size)
        k = int(math.log2(size // b))
        layers = [nn.Conv2d(channels, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for i in range(1, k):
            c = width * 2 ** i
            normalisation = {"batch": nn.BatchNorm2d(c), "layer": nn.GroupNorm(1, c), "none": nn.Identity()}[norm]
            layers += [nn.Conv2d(c // 2, c, 4, 2, 1, bias=False), normalisation, nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(width * 2 ** (k - 1), 1, b, 1, 0, bias=False)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()


def dcgan_init(module: nn.Module) -> None:
    """N(0, 0.02) weights, N(1, 0.02) norm scales (DCGAN)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    """Ring G and D: three hidden ReLU layers."""
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, outputs))


class RingDiscriminator(nn.Sequential):
    def forward(self, x):
        return super().forward(x).flatten()


# ---------------------------------------------------------------- losses (Table 1) and regularisers (Table 3)

def discriminator_loss(loss: str, real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """L_D of Table 1 on raw scores D(x), D(G(z))."""
    if loss == "nsgan":  # −log σ(D(x)) − log(1 − σ(D(G(z))))
        return F.softplus(-real_scores).mean() + F.softplus(fake_scores).mean()
    if loss == "lsgan":
        return ((real_scores - 1) ** 2).mean() + (fake_scores ** 2).mean()
    if loss == "hinge":
        return F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean()
    if loss == "wgan":
        return -real_scores.mean() + fake_scores.mean()
    raise ValueError(f"unknown loss {loss}")


def generator_loss(loss: str, fake_scores: torch.Tensor) -> torch.Tensor:
    """L_G of Table 1 (LSGAN: (D(G(z)) − 1)², the table's leading minus is a typo)."""
    if loss == "nsgan":  # −log σ(D(G(z)))
        return F.softplus(-fake_scores).mean()
    if loss == "lsgan":
        return ((fake_scores - 1) ** 2).mean()
    if loss in ("hinge", "wgan"):
        return -fake_scores.mean()
    raise ValueError(f"unknown loss {loss}")


def penalty_points(regularizer: str, real: torch.Tensor, fake: torch.Tensor, dragan_c: float) -> torch.Tensor:
    """Where Table 3 evaluates ∇_x D: x̂ = αx + (1 − α)G(z), α ~ U[0, 1] per sample (GP, 0-GP, Lipschitz), or
    x + δ, δ ~ N(0, cI) (DRAGAN)."""
    if regularizer == "dragan":
        return real + math.sqrt(dragan_c) * torch.randn_like(real)
    alpha = torch.rand(len(real), *([1] * (real.dim() - 1)), device=real.device)
    return alpha * real + (1 - alpha) * fake


def gradient_penalty(regularizer: str, discriminator: nn.Module,
                     points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Table 3 without λ, gradients w.r.t. D's *input* x̂: GP and DRAGAN (‖∇D‖ − 1)², 0-GP ‖∇D‖²,
    Lipschitz max(0, ‖∇D‖ − 1)². Returns (mean penalty, gradient norms) with a graph for D's parameters."""
    points = points.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(points).sum(), points, create_graph=True)
    norm = grad.flatten(1).norm(dim=1)
    if regularizer in ("gp", "dragan"):
        value = (norm - 1) ** 2
    elif regularizer == "zero-gp":
        value = norm ** 2
    elif regularizer == "lipschitz":
        value = F.relu(norm - 1) ** 2
    else:
        raise ValueError(f"unknown regulariser {regularizer}")
    return value.mean(), norm.detach()


# ---------------------------------------------------------------- training one (loss, regulariser) pair

def table_window(num_epochs: int, window: int) -> int:
    """Epochs averaged for Table 2: `window` (50) when the run is ≥ 6× as long (50 of 300), else its last sixth."""
    return window if num_epochs >= 6 * window else max(1, round(num_epochs / 6))


@torch.no_grad()
def generate(G: nn.Module, noise: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """G(noise) in eval mode, in batches; the previous train/eval mode is restored."""
    was_training = G.training
    G.eval()
    out = torch.cat([G(noise[i:i + batch_size]) for i in range(0, len(noise), batch_size)])
    G.train(was_training)
    return out


def save_samples(samples: torch.Tensor, path: Path, centres: torch.Tensor | None = None) -> None:
    """An image grid, or for the ring a scatter plot of the points over the 8 centres."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if samples.dim() == 4:
        from torchvision.utils import save_image  # imported here: torchvision's import costs seconds at start-up
        save_image(samples.cpu(), path, nrow=int(math.sqrt(len(samples))), normalize=True, value_range=(-1, 1))
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(3, 3))
    ax.scatter(*samples.cpu().T, s=2, alpha=0.5)
    ax.scatter(*centres.T, s=20, c="red", marker="x")
    ax.set_xlim(-1.5, 1.5), ax.set_ylim(-1.5, 1.5), ax.set_aspect("equal")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def prepare_data_and_models(args: Args, device) -> tuple[torch.Tensor, tuple, str]:
    """Training data on the device (images in [-1, 1] or ring points) and the monitor's models:
    (quality model, mode model, number of modes, ring centres or None) and a line naming them."""
    if args.dataset == "ring":
        ring = ring_data()
        centres = ring.centers.to(device)
        models = (lambda x: ring_quality(x, centres, ring.std), lambda x: nearest_mode(x, centres), len(centres),
                  ring.centers)
        return (ring.train[:args.num_train].to(device), models,
                "ring: Q = fraction within 3 std of a centre, modes = nearest of 8 centres")
    if args.dataset == "celeba":  # before the images: a missing package or weights file fails at once
        q_model, m_model, num_modes, name = face_models(args.data_root, args.face_embedding_weights, device,
                                                        args.identity_images)
    else:
        q_model, m_model, num_modes, name = digit_models(args.dataset, args.data_root, device)
    data = load_dataset(args.dataset, "train", image_size=args.image_size, root=args.data_root,
                        num_samples=args.num_train)
    return to_float(data.x.to(device)), (q_model, m_model, num_modes, None), name


def build_models(args: Args, channels: int, device) -> tuple[nn.Module, nn.Module]:
    """G and D from `args.seed`: every pair starts from the same weights, and the RNG stream that follows
    (batch noise, penalty draws) is the same for every pair."""
    torch.manual_seed(args.seed)
    if args.dataset == "ring":
        G, D = mlp(args.z_dim, args.width, 2), RingDiscriminator(*mlp(2, args.width, 1))
    else:
        G = Generator(args.z_dim, args.width, channels, args.image_size)
        D = Discriminator(args.width, channels, args.image_size, args.d_norm)
        dcgan_init(G), dcgan_init(D)
    return G.to(device), D.to(device)


def train_iteration(G: nn.Module, D: nn.Module, g_opt, d_opt, x: torch.Tensor, loss: str, reg: str, args: Args,
                    update_g: bool = True) -> dict[str, torch.Tensor]:
    """One D step on L_D + λ·penalty (eq. 10) and, if `update_g`, one G step on L_G (Table 1). No host sync."""
    z = torch.randn(len(x), args.z_dim, device=x.device)
    fake = G(z)
    d_loss = discriminator_loss(loss, D(x), D(fake.detach()))
    penalty = grad_norm = torch.zeros((), device=x.device)
    if reg != "none":
        penalty, norms = gradient_penalty(reg, D, penalty_points(reg, x, fake.detach(), args.dragan_c))
        grad_norm = norms.mean()
    d_opt.zero_grad(set_to_none=True)
    (d_loss + args.lam * penalty).backward()
    d_opt.step()
    if args.weight_clip is not None:
        with torch.no_grad():
            for p in D.parameters():
                p.clamp_(-args.weight_clip, args.weight_clip)
    out = {"d_loss": d_loss.detach(), "penalty": penalty.detach(), "grad_norm": grad_norm}
    if update_g:
        D.requires_grad_(False)  # G's step needs no gradients for D's weights
        g_loss = generator_loss(loss, D(fake))
        g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        g_opt.step()
        D.requires_grad_(True)
        out["g_loss"] = g_loss.detach()
    return out


def train_pair(args: Args, loss: str, reg: str, real: torch.Tensor, monitor_models: tuple, pair_dir: Path,
               device) -> dict:
    """Train one (loss, regulariser) GAN, monitoring S, Q, D every epoch. Returns its history and summary."""
    quality_model, mode_model, num_modes, centres = monitor_models
    G, D = build_models(args, real.shape[1] if real.dim() == 4 else 2, device)
    fused = device.type == "cuda" or None  # one kernel per update on GPU
    g_opt = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), fused=fused)
    d_opt = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), fused=fused)
    batches = Batches(real, batch_size=args.batch_size, generator=torch.Generator(device).manual_seed(args.seed))
    monitor = SQDMonitor(quality_model, mode_model, num_modes, args.num_quality, args.num_diversity)
    iter_monitor = SQDMonitor(quality_model, mode_model, num_modes, args.num_quality, args.num_diversity)
    fixed_noise = torch.randn(max(args.num_quality, args.num_diversity), args.z_dim,
                              generator=torch.Generator().manual_seed(args.seed + 12345)).to(device)
    history, iteration_rows, status, start_epoch, iteration = [], [], "running", 0, 0
    checkpoint_path = pair_dir / "checkpoint.pt"
    if args.resume is not None and checkpoint_path.exists():
        ckpt = torch.load(checkpoint_path, map_location=device, weights_only=False)
        if ckpt["status"].startswith("diverged") or ckpt["epoch"] >= args.epochs:
            return ckpt["result"]  # done (a finished pair resumed with a larger --epochs trains on)
        G.load_state_dict(ckpt["G"]), D.load_state_dict(ckpt["D"])
        g_opt.load_state_dict(ckpt["g_opt"]), d_opt.load_state_dict(ckpt["d_opt"])
        batches.load_state_dict(ckpt["batches"]), monitor.load_state_dict(ckpt["monitor"], device)
        iter_monitor.load_state_dict(ckpt["iter_monitor"], device)
        torch.set_rng_state(ckpt["rng"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["cuda_rng"])
        history, iteration_rows = ckpt["history"], ckpt["iteration_rows"]
        start_epoch, iteration = ckpt["epoch"], ckpt["iteration"]
    writer = SummaryWriter(str(pair_dir))
    if start_epoch == 0:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
            f"|{k}|{v}|" for k, v in {**asdict(args), "loss": loss, "regularizer": reg}.items()))

    def record(epoch, logs):
        samples = generate(G, fixed_noise)
        stats = monitor(samples, G=G.parameters(), D=D.parameters())
        row = {"loss": loss, "regularizer": reg, "epoch": epoch, "iteration": iteration, **stats, **logs}
        history.append(row)
        for key in ("S_G", "S_D", "Q", "D", "modes"):
            if math.isfinite(stats[key]):
                writer.add_scalar(f"eval/{key}", stats[key], epoch)
        if epoch % args.sample_every == 0 or epoch == args.epochs:
            grid = samples[:args.num_grid] if samples.dim() == 4 else samples[:args.num_diversity]
            save_samples(grid, pair_dir / "samples" / f"epoch_{epoch:04d}.png", centres)
            if grid.dim() == 4:
                writer.add_images("eval/samples", (grid + 1) / 2, epoch)
        write_csv(pair_dir / "sqd.csv", history)
        writer.flush()

    if start_epoch == 0 and not history:
        record(0, {})
    keys = ("d_loss", "g_loss", "penalty", "grad_norm")
    g_loss = torch.zeros((), device=device)
    progress = tqdm(range(start_epoch, args.epochs), desc=f"{loss}-{reg}", leave=False)
    for epoch in progress:
        t0, epoch_sums, n_logs = time.time(), {k: torch.zeros((), device=device) for k in keys}, 0
        for step in range(batches.steps_per_epoch):
            (x,) = batches.next()
            out = train_iteration(G, D, g_opt, d_opt, x, loss, reg, args, update_g=(step + 1) % args.n_critic == 0)
            g_loss = out["g_loss"] = out.get("g_loss", g_loss)  # the last G loss when G skipped this step
            iteration += 1
            for k in keys:
                epoch_sums[k] += out[k]
            n_logs += 1
            if iteration % args.log_every == 0:  # the only host syncs of the loop
                values = {k: float(out[k]) for k in keys}
                for k, v in values.items():
                    writer.add_scalar(f"losses/{k}", v, iteration)
                if not all(map(math.isfinite, values.values())):
                    status = f"diverged: non-finite loss at iteration {iteration} ({values})"
                    break
            if args.monitor_every and iteration % args.monitor_every == 0:
                stats = iter_monitor(generate(G, fixed_noise), G=G.parameters(), D=D.parameters())
                iteration_rows.append({"loss": loss, "regularizer": reg, "iteration": iteration, **stats})
                for key in ("S_G", "S_D", "Q", "D"):
                    if math.isfinite(stats[key]):
                        writer.add_scalar(f"iter/{key}", stats[key], iteration)
        if status != "running":
            break
        logs = {k: float(v) / max(n_logs, 1) for k, v in epoch_sums.items()}
        if not all(map(math.isfinite, logs.values())):
            status = f"diverged: non-finite loss in epoch {epoch + 1}"
            break
        writer.add_scalar("charts/iterations_per_sec", n_logs / (time.time() - t0), epoch + 1)
        record(epoch + 1, logs)
        progress.set_postfix(S_G=f"{history[-1]['S_G']:.2e}", Q=f"{history[-1]['Q']:.3f}", D=f"{history[-1]['D']:.3f}")
        if iteration_rows:
            write_csv(pair_dir / "sqd_iterations.csv", iteration_rows)
        if args.save_model:
            save_checkpoint(checkpoint_path, G, D, g_opt, d_opt, batches, (monitor, iter_monitor), history,
                            iteration_rows, epoch + 1, iteration, "running", None, device)
    result = summarize_pair(args, loss, reg, history, "finished" if status == "running" else status)
    writer.add_text("turning_point", str(result["turning_point_epoch"]))
    writer.close()
    if args.save_model:
        save_checkpoint(checkpoint_path, G, D, g_opt, d_opt, batches, (monitor, iter_monitor), history,
                        iteration_rows, history[-1]["epoch"], iteration, result["status"], result, device)
    if iteration_rows:
        write_csv(pair_dir / "sqd_iterations.csv", iteration_rows)
    return result


def save_checkpoint(path, G, D, g_opt, d_opt, batches, monitors, history, iteration_rows, epoch, iteration, status,
                    result, device) -> None:
    state = {"G": G.state_dict(), "D": D.state_dict(), "g_opt": g_opt.state_dict(), "d_opt": d_opt.state_dict(),
             "batches": batches.state_dict(), "monitor": monitors[0].state_dict(),
             "iter_monitor": monitors[1].state_dict(), "history": history,
             "iteration_rows": iteration_rows, "epoch": epoch, "iteration": iteration, "status": status,
             "result": result, "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None}
    tmp = path.with_suffix(".tmp")  # write then rename: an interruption keeps the previous checkpoint
    torch.save(state, tmp)
    os.replace(tmp, path)


def summarize_pair(args: Args, loss: str, reg: str, history: list[dict], status: str) -> dict:
    """Table 2 entries (mean Q and D over the last epochs) and the turning point of one pair."""
    trained = [r for r in history if r["epoch"] > 0]
    window = table_window(args.epochs, args.table_window)
    last = trained[-window:]
    column = lambda key: [r[key] for r in history]  # noqa: E731
    turning = find_turning_point(column("S_G"), column("S_D"), column("Q"), column("D"), args.jump_factor,
                                 args.drop_fraction, args.tp_window, args.tp_horizon)
    return {"loss": loss, "regularizer": reg, "status": status, "epochs": len(trained), "table_epochs": len(last),
            "Q_mean": float(np.mean([r["Q"] for r in last])) if last else math.nan,
            "D_mean": float(np.mean([r["D"] for r in last])) if last else math.nan,
            "turning_point_epoch": None if turning is None else history[turning]["epoch"], "history": history}


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def write_table2(out_dir: Path, results: list[dict], regs: tuple[str, ...], models: str) -> str:
    """Table 2: one row per loss, mean Q and D per regulariser, the turning-point epoch; CSV + Markdown."""
    by_pair = {(r["loss"], r["regularizer"]): r for r in results}
    losses = list(dict.fromkeys(r["loss"] for r in results))
    def fmt(v, digits):
        return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"
    header = ([f"Q {g}" for g in regs] + [f"D {g}" for g in regs] + [f"turning point {g}" for g in regs])
    rows = []
    missing = {"Q_mean": None, "D_mean": None, "turning_point_epoch": None, "status": "not run"}
    for loss in losses:
        pairs = [by_pair.get((loss, g), missing) for g in regs]
        rows.append([loss] + [fmt(p["Q_mean"], 3) for p in pairs] + [fmt(p["D_mean"], 3) for p in pairs]
                    + [("—" if p["turning_point_epoch"] is None else str(p["turning_point_epoch"]))
                       + ("" if p["status"] == "finished" else f" ({p['status'].split(':')[0]})") for p in pairs])
    with open(out_dir / "table2.csv", "w", newline="") as f:
        csv.writer(f).writerows([["loss"] + header] + rows)
    window = results[0]["table_epochs"]
    md = (f"Mean Q and D over the last {window} epochs of {results[0]['epochs']}; turning point: epoch or —.\n"
          f"Models: {models}\n\n| loss | " + " | ".join(header) + " |\n|" + "---|" * (len(header) + 1) + "\n"
          + "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n")
    (out_dir / "table2.md").write_text(md)
    return md


def plot_curves(out_dir: Path, results: list[dict]) -> None:
    """Figs. 3–5: S_G and S_D, Q, D per epoch; a column per loss, a line per regulariser; turning points dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    losses = list(dict.fromkeys(r["loss"] for r in results))
    fig, axes = plt.subplots(4, len(losses), figsize=(3.2 * len(losses), 9), squeeze=False, sharex=True)
    for col, loss in enumerate(losses):
        for r in (r for r in results if r["loss"] == loss):
            epochs = [h["epoch"] for h in r["history"]]
            for row, key in enumerate(("S_G", "S_D", "Q", "D")):
                line, = axes[row, col].plot(epochs, [h[key] for h in r["history"]], label=r["regularizer"], lw=1)
                if r["turning_point_epoch"] is not None:
                    axes[row, col].axvline(r["turning_point_epoch"], ls="--", color=line.get_color(), lw=0.8)
        axes[0, col].set_title(loss)
        for row, label in enumerate(("S_G (rad)", "S_D (rad)", "Q", "D (nats)")):
            axes[row, 0].set_ylabel(label)
        axes[0, col].set_yscale("log"), axes[1, col].set_yscale("log")
        axes[3, col].set_xlabel("epoch")
        axes[0, col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "sqd_curves.png", dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    args = tyro.cli(Args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # TF32 for training; no torch.compile: the penalties need double backward
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    real, models, models_name = prepare_data_and_models(args, device)

    if args.resume is not None:
        out_dir = Path(args.resume)
        run_name = out_dir.name
    else:
        run_name = args.run_name or f"{args.dataset}__{args.exp_name}__{args.seed}__{int(time.time())}"
        out_dir = Path(args.output_dir) / run_name
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "args.json").write_text(json.dumps(asdict(args), indent=2))
    print(f"run {out_dir} | device {device} | {models_name}")

    results = []
    pairs = [(loss, reg) for loss in args.losses for reg in args.regularizers]
    try:
        for loss, reg in pairs:
            result = train_pair(args, loss, reg, real, models, out_dir / f"{loss}-{reg}", device)
            results.append(result)
            print(f"{loss}-{reg}: {result['status']}, Q {result['Q_mean']:.3f}, D {result['D_mean']:.3f}, "
                  f"turning point {result['turning_point_epoch']}")
    finally:  # an error or Ctrl-C keeps everything finished so far
        if results:
            write_csv(out_dir / "sqd.csv", [h for r in results for h in r["history"]])
            table = write_table2(out_dir, results, tuple(dict.fromkeys(r["regularizer"] for r in results)), models_name)
            summary = [{k: v for k, v in r.items() if k != "history"} for r in results]
            (out_dir / "results.json").write_text(json.dumps({"run": run_name, "models": models_name,
                                                              "pairs": summary, "args": asdict(args)}, indent=2))
            (out_dir / "results.md").write_text(f"# {run_name}\n\n{table}")
            plot_curves(out_dir, results)
            print(table)
