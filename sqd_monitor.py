"""SQD: measuring GAN training stability (S), visual quality (Q) and mode diversity (D) in real time.

Paper: "Measuring GAN Training in Real Time" (anonymous ICLR 2021 submission, OpenReview), the SQD framework.

S (eqs. 4-5): the angle between consecutive snapshots of G's (and D's) weight matrices. Q (eq. 6): the mean score of
a quality model (MTCNN's face probability; for digits, acceptance by a classifier with a reject class of non-digits).
D (eqs. 7-9): the James-Stein entropy of the samples' nearest modes. The finding: without gradient penalty (GP),
NSGAN, LSGAN, Hinge and WGAN reach a "turning point" where S jumps and Q and D fall for good; GP removes it.

    python sqd_monitor.py                      # MNIST 64×64, 4 losses × {none, GP}, 300 epochs (Table 2's protocol)
    python sqd_monitor.py --preset table2 --face-embedding-weights 20180402-114759-vggface2.pt   # CelebA, the paper
    python sqd_monitor.py --preset fig7        # NSGAN with every regulariser of Table 3 (Fig. 7)
    python sqd_monitor.py --preset cpu-mini    # the turning-point experiment at CPU scale: NSGAN, LSGAN × {none, GP}
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm import tqdm

from common.datasets import Batches, load_dataset, to_float, to_uint8
from common.fid import DigitClassifier, DigitCNN, full_precision, state_digest, tensor_digest, train_digit_cnn, unreadable

LossName = Literal["nsgan", "lsgan", "hinge", "wgan"]
RegName = Literal["none", "gp", "dragan", "zero-gp", "lipschitz"]

@dataclass
class Args:
    # experiment
    preset: Literal["default", "table2", "fig7", "cpu-mini"] = "default"
    """paper experiment to start from; every other flag overrides it: default (MNIST 64×64, Table 2's protocol), table2
    (CelebA), fig7 (CelebA, NSGAN × every regulariser of Table 3), cpu-mini (the turning point on 2 CPU cores)"""
    seed: int = 1
    """seed of the weights, data order, noise and the monitor's fixed samples (every pair starts from the same G, D)"""
    cuda: bool = True
    """use CUDA when available"""
    threads: int = 0
    """torch CPU threads (0 = torch's default)"""
    matmul_precision: Literal["auto", "highest", "high", "medium"] = "auto"
    """training matmuls: highest = full float32; high = TF32 on CUDA (float32 elsewhere); medium = bf16-backed
    float32 on capable CPUs/GPUs (about 2× on a recent CPU); auto = high on CUDA, highest on CPU. Metrics: always full"""
    compile: bool = False
    """torch.compile G and D (inductor); the regularisers' double backward runs through the uncompiled D"""
    track: bool = False
    """log to Weights & Biases (TensorBoard synced; WANDB_MODE=offline is respected)"""
    wandb_project_name: str = "gan-stability"
    """W&B project of --track"""
    output_dir: str = "runs"
    """folder that receives the run folder"""
    run_name: str | None = None
    """run folder name (default {dataset}__sqd_monitor__{seed}__{date-time}-{random})"""
    save_model: bool = False
    """write checkpoint.pt per pair (every epoch end, the end, Ctrl-C): needed by --resume"""
    resume: str | None = None
    """run folder to continue; its args.json is the default and flags given with it override it (e.g. --epochs)"""
    # data
    dataset: Literal["mnist", "stacked-mnist", "celeba", "fake"] = "mnist"
    """training data; it picks the quality and mode models (digit classifier; MTCNN + face identities); fake: tests"""
    data_root: str = "data"
    """datasets, cached classifiers and face-identity centres"""
    image_size: Literal[16, 28, 32, 64, 128] = 64
    """image side (DCGAN: 64; 28 or 32 make digit runs fit a CPU)"""
    num_train: int = 0
    """keep the first n training images (0 = all); an epoch is one pass over them"""
    # method
    losses: list[LossName] = field(default_factory=lambda: ["nsgan", "lsgan", "hinge", "wgan"])
    """GAN losses (Table 1); every loss runs with every regulariser"""
    regularizers: list[RegName] = field(default_factory=lambda: ["none", "gp"])
    """discriminator regularisers (Table 3)"""
    gp_weight: float = 10.0
    """λ of eq. (10), the weight of every regulariser (the paper: 10; 100 in Fig. 7a)"""
    dragan_c: float = 0.1
    """DRAGAN's variance c, δ ~ N(0, cI) (not given by the paper; std ≈ 0.32 on [-1, 1] images)"""
    d_norm: Literal["layer", "batch", "none"] = "layer"
    """normalisation in D: layer (penalties stay per-sample), batch (DCGAN), none"""
    # training
    epochs: int = 300
    """training epochs per pair (the paper: 300)"""
    batch_size: int = 128
    """batch size (DCGAN)"""
    lr: float = 2e-4
    """Adam learning rate of G and D, betas (0.5, 0.999) (DCGAN)"""
    z_dim: int = 100
    """latent size (DCGAN)"""
    width: int = 64
    """channels of D's first / G's last conv layer (DCGAN: 64)"""
    # evaluation
    num_quality: int = 1000
    """generated samples for Q (the paper: 1,000)"""
    num_diversity: int = 2000
    """generated samples for D (the paper: 2,000)"""
    stability_params: Literal["weights", "all"] = "weights"
    """S over the weights of conv and linear layers (the paper's weight matrices), or over all parameters"""
    face_embedding_weights: str = ""
    """celeba: state dict of facenet-pytorch's InceptionResnetV1 (e.g. 20180402-114759-vggface2.pt)"""

FACES = dict(dataset="celeba", face_embedding_weights="20180402-114759-vggface2.pt")
PRESETS: dict[str, Args] = {
    "default": Args(),  # DCGAN 64×64 (the paper gives no architecture), 4 losses × {none, GP}, 300 epochs, λ = 10
    "table2": replace(Args(), preset="table2", **FACES),  # Sec. 4: CelebA, Table 2 and Figs. 2-6
    "fig7": replace(Args(), preset="fig7", losses=["nsgan"], regularizers=list(RegName.__args__), **FACES),  # Fig. 7
    # ~25 min of one CPU core: NSGAN and LSGAN (the paper's earliest turning point) × {none, GP} at 10× the DCGAN
    # learning rate, narrow 28×28 nets, 150 epochs of 100 steps
    "cpu-mini": replace(Args(), preset="cpu-mini", losses=["nsgan", "lsgan"], image_size=28, width=16, num_train=6400,
                        batch_size=64, lr=2e-3, epochs=150, num_quality=500, num_diversity=1000),
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
    raise SystemExit(f"error: {message}")  # one line on stderr, exit code 1, no traceback

def validate(args: Args) -> None:
    """Every user error as one line naming the flag, before anything is written."""
    for name, value in asdict(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"--{name.replace('_', '-')} is {value}: give a finite number")
    for name in ("epochs", "batch_size", "lr", "z_dim", "width", "num_quality", "num_diversity", "dragan_c", "threads",
                 "num_train", "gp_weight"):
        value, zero_ok = getattr(args, name), name in ("threads", "num_train", "gp_weight")
        if value < 0 or (value == 0 and not zero_ok):
            fail(f"--{name.replace('_', '-')} must be {'≥ 0' if zero_ok else 'positive'}, got {value}")
    if not args.losses or not args.regularizers:
        fail("--losses and --regularizers need at least one value each")
    if args.resume is not None and not any(Path(args.resume).glob("*/checkpoint.pt")):
        fail(f"{args.resume} has no checkpoint.pt: only runs started with --save-model can be resumed")

# ---------------------------------------------------------------- the SQD monitor (copy this part)

def angle_between(u: torch.Tensor, v: torch.Tensor) -> float:
    """Eq. (4): arccos(<u, v> / (|u| |v|)) in radians, computed as 2·atan2(|û − v̂|, |û + v̂|) in float64 (the same
    angle without arccos's loss of precision near 0: consecutive snapshots are often < 1e-3 apart)."""
    u_hat, v_hat = (t.double().flatten() / t.double().norm() for t in (u, v))
    return float(2 * torch.atan2((u_hat - v_hat).norm(), (u_hat + v_hat).norm()))

def james_stein_probs(counts: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Hausser & Strimmer (2009) shrinkage of u_j = count_j / n towards uniform 1/m:
    λ = (1 − Σ u²) / ((n − 1) Σ (1/m − u)²) clipped to [0, 1] (λ = 1 if the denominator is 0 or n ≤ 1);
    p̂ = λ/m + (1 − λ) u. Returns (p̂, λ)."""
    counts = counts.double().flatten()
    n, m = float(counts.sum()), len(counts)
    u = counts / max(n, 1.0)
    denominator = (n - 1) * float(((1.0 / m - u) ** 2).sum())
    lam = 1.0 if n <= 1 or denominator == 0 else min(1.0, max(0.0, (1 - float((u ** 2).sum())) / denominator))
    return lam / m + (1 - lam) * u, lam

def james_stein_entropy(counts: torch.Tensor) -> float:
    """Eq. (9) with the James-Stein estimator (Algorithm 1): −Σ p̂ ln p̂ (natural log; at most ln m)."""
    return 0.0 + float(torch.special.entr(james_stein_probs(counts)[0]).sum())  # 0.0 + x: no "-0.0" when collapsed

def weight_matrices(net: nn.Module, which: str = "weights") -> list[torch.Tensor]:
    """S's vectors: conv and linear weights (eq. 5's W; norm scales and biases would dominate ‖w‖), or all parameters."""
    layers = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
    return list(net.parameters()) if which == "all" else [m.weight for m in net.modules() if isinstance(m, layers)]

class SQDMonitor:
    """monitor(samples, G=weight_matrices(G), D=weight_matrices(D)) → S_G, S_D (angles since the last call; nan at first),
    Q, D, modes hit. judge(samples, num_quality) → (quality in [0, 1] of the first num_quality samples, int64 mode in
    [0, num_modes) of each): one pass of the quality and mode models. The state: `snapshots`, a flat copy per network."""

    def __init__(self, judge: Callable, num_modes: int, num_quality: int = 1000, num_diversity: int = 2000):
        self.judge, self.num_modes, self.num_quality, self.num_diversity = judge, num_modes, num_quality, num_diversity
        self.snapshots: dict[str, torch.Tensor] = {}

    def __call__(self, samples: torch.Tensor, **networks: list[torch.Tensor]) -> dict[str, float]:
        stats = {}
        for name, tensors in networks.items():  # eqs. (4)-(5): the angle to the previous call's weights
            flat = torch.cat([t.detach().reshape(-1) for t in tensors]).clone()
            stats[f"S_{name}"] = angle_between(self.snapshots[name], flat) if name in self.snapshots else math.nan
            self.snapshots[name] = flat
        with torch.no_grad(), full_precision():
            quality, modes = self.judge(samples[:max(self.num_quality, self.num_diversity)], self.num_quality)
        modes = modes[:self.num_diversity].long().cpu()
        if len(modes) and (int(modes.min()) < 0 or int(modes.max()) >= self.num_modes):
            raise ValueError(f"mode indices must lie in [0, {self.num_modes}), got {int(modes.min())}…{int(modes.max())}")
        counts = torch.bincount(modes, minlength=self.num_modes)
        stats["Q"] = float(quality[:self.num_quality].double().mean())  # eq. (6)
        stats["D"], stats["modes"] = james_stein_entropy(counts), int((counts > 0).sum())  # eqs. (8)-(9)
        return stats

def find_turning_point(s_g: list[float], s_d: list[float], q: list[float], d: list[float], jump_factor: float = 3.0,
                       drop_fraction: float = 0.1, window: int = 5, persist: int = 5) -> int | None:
    """First epoch t (an index into the lists) where S_G[t] or S_D[t] is > 0 and ≥ jump_factor × its median over
    t−window … t−1, and Q or D falls and stays down ("barely improves in future training"): its median over t …
    t+persist−1 is ≤ (1 − drop_fraction) × its median over t−window … t−1, which must be > 0. None if none does."""
    def median(x, start, stop):
        values = x[start:stop]
        return float(np.median(values)) if len(values) == stop - start and all(map(math.isfinite, values)) else math.nan

    for t in range(window, len(q) - persist + 1):
        jump = any(s[t] > 0 and s[t] >= jump_factor * median(s, t - window, t) for s in (s_g, s_d))
        drop = any(median(x, t - window, t) > 0 and median(x, t, t + persist) <= (1 - drop_fraction) *
                   median(x, t - window, t) for x in (q, d))
        if jump and drop:
            return t
    return None

# ---------------------------------------------------------------- quality and mode models (one pass per call)

REJECT_RECIPE = {"reject_share": 0.2, "families": "uniform, gaussian, constant, blobs", "epochs": 3, "seed": 0}

def non_digits(n: int, size: int, seed: int) -> torch.Tensor:
    """The reject class: n uint8 1×size×size images, a quarter each of uniform noise, Gaussian noise around a grey
    level, constants and smooth blobs. No degraded digits (blurred, noisy, erased): Q must rank what it never saw."""
    gen, k = torch.Generator().manual_seed(seed), n // 4
    level = torch.rand(2 * k, 1, 1, 1, generator=gen) * 2 - 1
    blobs = torch.cat([F.interpolate(torch.rand((n - 3 * k) // 6 + 1, 1, c, c, generator=gen) * 2 - 1, size=size,
                                     mode="bilinear", align_corners=False) for c in range(2, 8)])[:n - 3 * k]
    return to_uint8(torch.cat([torch.rand(k, 1, size, size, generator=gen) * 2 - 1,
                               level[:k] + torch.rand(k, 1, 1, 1, generator=gen) * torch.randn(k, 1, size, size, generator=gen),
                               level[k:].expand(k, 1, size, size),
                               blobs * (1 + 3 * torch.rand(len(blobs), 1, 1, 1, generator=gen))]))

def digit_judge(classifier: DigitClassifier, threshold: float | None, samples: torch.Tensor, num_quality: int):
    """One pass of the reject-class classifier. Quality: 1 if every digit (3 for Stacked MNIST) has a class with
    p ≥ threshold (None: that weakest best p); mode: the most likely digit class, or 100·r + 10·g + b."""
    features = classifier.features(samples)
    p = classifier.net.head(features.reshape(len(features), -1, classifier.net.head.in_features)).softmax(-1)
    best, digit = p[..., :10].max(-1)  # the reject class's share of p lowers every digit's
    score = best.min(1).values[:num_quality]
    modes = (digit * 10 ** torch.arange(digit.shape[1] - 1, -1, -1, device=digit.device)).sum(1)
    return (score if threshold is None else (score >= threshold).float()), modes

def digit_models(args: Args, device) -> tuple[Callable, int, str, torch.Tensor]:
    """common/'s digit CNN trained with an 11th, reject class (cached, keyed by data and recipe); its threshold passes
    95% of the first half of the real test images; the second half is the real-data reference."""
    base = "mnist" if args.dataset == "stacked-mnist" else args.dataset
    train = load_dataset(base, "train", image_size=28, root=args.data_root)
    recipe = dict(REJECT_RECIPE, epochs=3 if base != "fake" else 5)
    key = hashlib.sha256((tensor_digest(train.x, train.y) + repr(sorted(recipe.items()))).encode()).hexdigest()
    path, net = Path(args.data_root) / "sqd" / f"{base}_reject_cnn_{key[:20]}.pt", DigitCNN(11)
    try:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # not there yet, truncated or foreign: train it
        unreadable(path, e) if path.exists() else None
        reject = non_digits(int(len(train) * recipe["reject_share"]), 28, recipe["seed"])
        net = train_digit_cnn(torch.cat([train.x, reject]), torch.cat([train.y, torch.full((len(reject),), 10)]),
                              epochs=recipe["epochs"], seed=recipe["seed"], device=device).cpu()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), path.with_suffix(f".{os.getpid()}.tmp"))
        os.replace(path.with_suffix(f".{os.getpid()}.tmp"), path)
    test = load_dataset(args.dataset, "test", image_size=args.image_size, root=args.data_root)
    classifier, half = DigitClassifier(net, args.dataset, 0.0, device), len(test) // 2
    with torch.no_grad(), full_precision():
        threshold = float(digit_judge(classifier, None, test.x[:half], half)[0].double().quantile(0.05))  # 95% pass
    name = (f"digits-cnn+reject({args.dataset}): Q = share of samples whose digits all win with p ≥ {threshold:.4f} "
            "(95% of real test images), modes = classes")
    return partial(digit_judge, classifier, threshold), 1000 if base != args.dataset else 10, name, to_float(test.x[half:])

def to_faces(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] → 160×160, the input size of MTCNN and of the face embedding."""
    return F.interpolate(x.float(), size=(160, 160), mode="bilinear", align_corners=False).clamp(-1, 1)

def face_judge(mtcnn, embed: nn.Module, centres: torch.Tensor, samples: torch.Tensor, num_quality: int):
    """Quality: MTCNN's probability of its best face box (0 if none); mode: the nearest identity centre (eq. 8)."""
    images = ((to_faces(samples[:num_quality]) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    quality = [max((p for p in ps if p is not None), default=0.0) for ps in mtcnn.detect(images)[1]]
    features = torch.cat([embed(to_faces(samples[i:i + 256])) for i in range(0, len(samples), 256)])
    return torch.tensor(quality, dtype=torch.float64), torch.cdist(features.double(), centres.double()).argmin(1)

def face_models(args: Args, device) -> tuple[Callable, int, str, torch.Tensor]:
    """MTCNN for Q; for D the identity centres (eq. 7) of ALL CelebA images (the paper: 202,599, m = 10,177 identities)
    in a face-embedding space, cached keyed by the embedding weights, the images and the identity file."""
    try:
        from facenet_pytorch import MTCNN, InceptionResnetV1
    except ImportError as e:
        fail(f"the face models need facenet-pytorch ({e}): pip install --no-deps facenet-pytorch requests")
    if not Path(args.face_embedding_weights).is_file():
        fail(f"--face-embedding-weights '{args.face_embedding_weights}' is not a file: pass facenet-pytorch's vggface2 weights")
    embed = InceptionResnetV1(pretrained=None, device=device).eval()
    state = torch.load(args.face_embedding_weights, map_location="cpu", weights_only=True)
    embed.load_state_dict({k: v for k, v in state.items() if not k.startswith("logits.")})
    root = Path(args.data_root)
    parts = [load_dataset("celeba", s, image_size=64, root=root) for s in ("train", "test")  # all: train + valid, test
             if s == "train" or (root / "celeba" / "list_eval_partition.txt").exists()]
    images, ids = torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts])
    key = state_digest(embed) + tensor_digest(images, ids) + (root / "celeba" / "identity_CelebA.txt").read_text()
    cache = root / "sqd" / f"celeba_identity_centres_{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"
    try:
        centres = torch.load(cache, weights_only=True)
    except Exception as e:  # eq. (7): the mean embedding of each identity's images
        unreadable(cache, e) if cache.exists() else None
        with torch.no_grad():
            features = torch.cat([embed(to_faces(to_float(images[i:i + 256].to(device)))).cpu()
                                  for i in range(0, len(images), 256)])
        index = torch.unique(ids, return_inverse=True)[1]
        centres = torch.zeros(int(index.max()) + 1, features.shape[1]).index_add_(0, index, features)
        centres /= torch.bincount(index)[:, None].float()
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(centres, cache.with_suffix(f".{os.getpid()}.tmp"))
        os.replace(cache.with_suffix(f".{os.getpid()}.tmp"), cache)
    print(f"face identities: m = {len(centres)} from {len(images)} CelebA images (D ≤ ln m = {math.log(len(centres)):.2f})")
    judge = partial(face_judge, MTCNN(device=device, select_largest=False), embed, centres.to(device))
    return judge, len(centres), f"MTCNN face probability (Q), nearest of m = {len(centres)} identities (D)", to_float(images[-2000:])

# ---------------------------------------------------------------- networks (DCGAN), losses (Table 1), regularisers (Table 3)

def build_models(args: Args, channels: int, device) -> tuple[nn.Sequential, nn.Sequential]:
    """DCGAN from --seed (every pair starts from the same weights): G stride-2 transposed convs, BN, ReLU, tanh; D
    mirrored (leaky ReLU 0.2, --d-norm, one raw score). Weights N(0, 0.02), normalisation scales N(1, 0.02)."""
    torch.manual_seed(args.seed)
    b, w, z = 7 if args.image_size == 28 else 4, args.width, args.z_dim  # G's first feature map: b×b, then k doublings
    k = int(math.log2(args.image_size // b))
    norm = {"batch": nn.BatchNorm2d, "layer": partial(nn.GroupNorm, 1), "none": lambda c: nn.Identity()}[args.d_norm]
    G = nn.Sequential(nn.Unflatten(1, (z, 1, 1)), nn.ConvTranspose2d(z, w * 2 ** (k - 1), b, 1, 0, bias=False))
    D = nn.Sequential(nn.Conv2d(channels, w, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True))
    for i in range(k - 1, 0, -1):
        G.extend([nn.BatchNorm2d(w * 2 ** i), nn.ReLU(True), nn.ConvTranspose2d(w * 2 ** i, w * 2 ** (i - 1), 4, 2, 1, bias=False)])
    for i in range(1, k):
        D.extend([nn.Conv2d(w * 2 ** (i - 1), w * 2 ** i, 4, 2, 1, bias=False), norm(w * 2 ** i), nn.LeakyReLU(0.2, True)])
    G.extend([nn.BatchNorm2d(w), nn.ReLU(True), nn.ConvTranspose2d(w, channels, 4, 2, 1, bias=False), nn.Tanh()])
    D.extend([nn.Conv2d(w * 2 ** (k - 1), 1, b, 1, 0, bias=False), nn.Flatten(0)])
    for m in [*G.modules(), *D.modules()]:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, 0.02), nn.init.zeros_(m.bias)
    return G.to(device), D.to(device)

def discriminator_loss(loss: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """L_D of Table 1 on raw scores D(x), D(G(z)); NSGAN's −log σ(t) − log(1 − σ(t')) = softplus(−t) + softplus(t')."""
    return {"nsgan": lambda: F.softplus(-real).mean() + F.softplus(fake).mean(),
            "lsgan": lambda: ((real - 1) ** 2).mean() + (fake ** 2).mean(),
            "hinge": lambda: F.relu(1 - real).mean() + F.relu(1 + fake).mean(),
            "wgan": lambda: fake.mean() - real.mean()}[loss]()

def generator_loss(loss: str, fake: torch.Tensor) -> torch.Tensor:
    """L_G of Table 1: NSGAN −log σ(D(G(z))), LSGAN (D(G(z)) − 1)² (the table's minus is a typo), Hinge, WGAN −D(G(z))."""
    return F.softplus(-fake).mean() if loss == "nsgan" else ((fake - 1) ** 2).mean() if loss == "lsgan" else -fake.mean()

def penalty_points(regularizer: str, real: torch.Tensor, fake: torch.Tensor, dragan_c: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Where Table 3 evaluates ∇_x D: x̂ = αx + (1 − α)G(z), α ~ U[0, 1] per sample (GP, 0-GP, Lipschitz), or
    x + δ, δ ~ N(0, cI) (DRAGAN)."""
    if regularizer == "dragan":
        return real + math.sqrt(dragan_c) * torch.randn(real.shape, device=real.device, generator=generator)
    alpha = torch.rand(len(real), *([1] * (real.dim() - 1)), device=real.device, generator=generator)
    return alpha * real + (1 - alpha) * fake

def gradient_penalty(regularizer: str, discriminator: nn.Module, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Table 3 without λ, gradients w.r.t. D's *input* x̂: GP and DRAGAN (‖∇D‖ − 1)², 0-GP ‖∇D‖², Lipschitz
    max(0, ‖∇D‖ − 1)². Returns (mean penalty, gradient norms) with a graph for D's parameters."""
    points = points.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(points).sum(), points, create_graph=True)
    norm = grad.flatten(1).norm(dim=1)
    value = {"gp": (norm - 1) ** 2, "dragan": (norm - 1) ** 2, "zero-gp": norm ** 2, "lipschitz": F.relu(norm - 1) ** 2}
    return value[regularizer].mean(), norm.detach()

# ---------------------------------------------------------------- one (loss, regulariser) pair; Table 2 and figures

@torch.no_grad()
def generate(G: nn.Module, noise: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """G(noise) in eval mode (BatchNorm running statistics), in batches; training mode restored."""
    G.eval()
    out = torch.cat([G(noise[i:i + batch_size]) for i in range(0, len(noise), batch_size)])
    G.train()
    return out

def save_checkpoint(path: Path, G, D, g_opt, d_opt, batches: Batches, monitor: SQDMonitor, noise_gen, counters) -> None:
    """Everything the loop needs to go on bit-identically; written to a temporary file, then renamed."""
    torch.save({"G": G.state_dict(), "D": D.state_dict(), "g_opt": g_opt.state_dict(), "d_opt": d_opt.state_dict(),
                "batches": batches.state_dict(), "monitor": monitor.snapshots, "noise_gen": noise_gen.get_state(),
                "torch_rng": torch.get_rng_state(), "counters": counters,
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)

def train(args: Args, loss: str, reg: str, data: torch.Tensor, judge: Callable, num_modes: int, run_dir: Path,
          device: torch.device, stop: threading.Event, header: dict) -> dict:
    """One (loss, regulariser) pair into run_dir, S, Q and D at every epoch end; --resume continues its checkpoint."""
    from torch.utils.tensorboard import SummaryWriter
    from torchvision.utils import save_image
    G, D = build_models(args, data.shape[1], device)
    weights = {"G": weight_matrices(G, args.stability_params), "D": weight_matrices(D, args.stability_params)}  # S's W
    torch._dynamo.reset()  # --compile: each pair compiles afresh (recompilations would otherwise pile up in one cache)
    fast_G, fast_D = (torch.compile(m) if args.compile else m for m in (G, D))  # the training steps' G and D
    g_opt, d_opt = (torch.optim.Adam(m.parameters(), lr=args.lr, betas=(0.5, 0.999), fused=device.type == "cuda") for m in (G, D))
    batches = Batches(data, batch_size=args.batch_size, generator=torch.Generator(device).manual_seed(args.seed))
    noise_gen = torch.Generator(device).manual_seed(args.seed + 1)  # z, α and δ of the training steps
    fixed_noise = torch.randn(max(args.num_quality, args.num_diversity), args.z_dim,  # the monitor's samples
                              generator=torch.Generator().manual_seed(args.seed + 2)).to(device)
    monitor = SQDMonitor(judge, num_modes, args.num_quality, args.num_diversity)
    per_epoch, keys = batches.steps_per_epoch, ("d_loss", "g_loss", "penalty", "grad_norm")
    step, total, history, reason, checkpoint = 0, args.epochs * per_epoch, [], "", run_dir / "checkpoint.pt"
    if args.resume is not None and checkpoint.exists():
        try:
            ckpt = torch.load(checkpoint, map_location=device, weights_only=False)
        except Exception as e:
            fail(f"{checkpoint} cannot be read ({type(e).__name__}): delete that folder to restart the pair")
        for obj, key in ((G, "G"), (D, "D"), (g_opt, "g_opt"), (d_opt, "d_opt"), (batches, "batches")):
            obj.load_state_dict(ckpt[key])
        monitor.snapshots = ckpt["monitor"]
        noise_gen.set_state(ckpt["noise_gen"].cpu()), torch.set_rng_state(ckpt["torch_rng"].cpu())
        torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["cuda_rng"]]) if ckpt["cuda_rng"] and torch.cuda.is_available() else None
        step, history = ckpt["counters"]
    writer = SummaryWriter(str(run_dir), purge_step=step or None)
    if not history:  # epoch 0: the initial G (S is nan: no previous snapshot)
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
            f"|{k}|{v}|" for k, v in {**asdict(args), "loss": loss, "regularizer": reg}.items()))
        history.append({"epoch": 0, "step": 0, **monitor(generate(G, fixed_noise), **weights)})
    last_step, last_time = step, time.perf_counter()
    bar = tqdm(total=total, initial=min(step, total), desc=f"{loss}-{reg}", disable=not sys.stdout.isatty())
    while step < total and not stop.is_set():  # stop: Ctrl-C or SIGTERM, checked only between whole steps
        (x,) = batches.next()
        real = to_float(x)  # the data stays uint8 on the device; one batch at a time becomes float
        fake = fast_G(torch.randn(len(real), args.z_dim, device=device, generator=noise_gen))
        # D step on eq. (10): L_D of Table 1 + λ · a regulariser of Table 3 (gradients w.r.t. D's input; eager D)
        d_loss = discriminator_loss(loss, fast_D(real), fast_D(fake.detach()))
        penalty, norms = gradient_penalty(reg, D, penalty_points(reg, real, fake.detach(), args.dragan_c, noise_gen)) \
            if reg != "none" else (torch.zeros((), device=device),) * 2
        d_opt.zero_grad(set_to_none=True)
        (d_loss + args.gp_weight * penalty).backward()
        d_opt.step()
        g_loss = generator_loss(loss, fast_D(fake))  # G step on L_G of Table 1; D's weights get no gradient
        g_opt.zero_grad(set_to_none=True)
        g_loss.backward(inputs=list(G.parameters()))
        g_opt.step()
        step += 1
        bar.update(1)
        if step % 50 == 0 or step % per_epoch == 0:  # the loop's only host syncs: logs every 50 steps, epoch ends
            values = dict(zip(keys, torch.stack([d_loss, g_loss, penalty, norms.mean()]).tolist()))
            if not all(map(math.isfinite, values.values())):
                reason = f"non-finite loss at step {step}"
                break
            for key, value in values.items():
                writer.add_scalar(f"losses/{key}", value, step)
            writer.add_scalar("charts/SPS", (step - last_step) / (time.perf_counter() - last_time), step)
            last_step, last_time = step, time.perf_counter()
        if step % per_epoch == 0:  # epoch end: the SQD monitor, samples, checkpoint
            epoch, samples = step // per_epoch, generate(G, fixed_noise)
            stats = monitor(samples, **weights)
            history.append({"epoch": epoch, "step": step, **stats, **values})  # with the losses of the epoch's last step
            for key in ("S_G", "S_D", "Q", "D", "modes"):
                writer.add_scalar(f"eval/{key}", stats[key], step)
            if epoch % 10 == 0 or step == total:  # sample grids every 10 epochs and at the end
                (run_dir / "samples").mkdir(exist_ok=True)
                save_image(samples[:64].cpu(), run_dir / "samples" / f"epoch_{epoch:04d}.png", normalize=True, value_range=(-1, 1))
            if args.save_model:
                save_checkpoint(checkpoint, G, D, g_opt, d_opt, batches, monitor, noise_gen, (step, history))
    bar.close()
    status = "diverged" if reason else "interrupted" if step < total else "finished"
    if status == "interrupted" and args.save_model:
        save_checkpoint(checkpoint, G, D, g_opt, d_opt, batches, monitor, noise_gen, (step, history))
    writer.close()
    last = [h for h in history if h["epoch"] > 0][-table_window(args.epochs):]  # Table 2: mean Q and D of these
    turning = find_turning_point(*([h[k] for h in history] for k in ("S_G", "S_D", "Q", "D")))
    result = {**header, "config": f"{loss}-{reg}", "loss": loss, "regularizer": reg, "status": status, "reason": reason,
              "steps": step, "epochs": history[-1]["epoch"], "Q_mean": float(np.mean([h["Q"] for h in last])) if last else None,
              "D_mean": float(np.mean([h["D"] for h in last])) if last else None,
              "turning_point_epoch": None if turning is None else history[turning]["epoch"], "history": history}
    write_results(run_dir, result, summarize([result]))
    return result

def write_results(folder: Path, result: dict, table: str) -> None:
    """results.json (temporary file, then renamed) and results.md, whose first line says a status but finished."""
    (folder / "results.tmp").write_text(json.dumps(result, indent=2))
    os.replace(folder / "results.tmp", folder / "results.json")
    (folder / "results.md").write_text(("" if result["status"] == "finished" else f"**status: {result['status']}**\n\n")
                                       + table)

def table_window(num_epochs: int) -> int:
    """Epochs averaged for Table 2: the last 50 when the run has ≥ 300 (the paper: 250-300), else its last sixth."""
    return 50 if num_epochs >= 300 else max(1, round(num_epochs / 6))

def summarize(results: list[dict]) -> str:
    """Table 2 from pairs' results.json dicts alone: per loss and regulariser the mean Q and D over the last epochs and
    the turning point (a pair that did not finish says so), then Q and D of real held-out data and of uniform noise."""
    a, by_pair = results[0]["args"], {(r["loss"], r["regularizer"]): r for r in results}
    regs = [g for g in RegName.__args__ if (g in {r["regularizer"] for r in results})]
    head = [f"Q {g}" for g in regs] + [f"D {g}" for g in regs] + [f"turning point {g}" for g in regs]
    lines = [f"{a['dataset']}: mean Q and D over the last {table_window(a['epochs'])} of "
             f"{a['epochs']} epochs; turning point: epoch or —. Models: {results[0]['models']}", "",
             "| loss | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]
    for loss in (loss for loss in LossName.__args__ if loss in {r["loss"] for r in results}):
        pairs = [by_pair.get((loss, g)) for g in regs]
        cells = [f"{p[k]:.3f}" if p and p["status"] == "finished" else "—" for k in ("Q_mean", "D_mean") for p in pairs]
        cells += ["not run" if p is None else str(p["turning_point_epoch"] or "—") + (
            "" if p["status"] == "finished" else f" ({p['status']} after {p['epochs']} epochs)") for p in pairs]
        lines.append(f"| {loss} | " + " | ".join(cells) + " |")
    lines += ["", "| reference | Q | D | modes hit |", "|---|---|---|---|"] + [
        f"| {name} | {v['Q']:.3f} | {v['D']:.3f} | {v['modes']} |" for name, v in results[0]["reference"].items()]
    return "\n".join(lines) + "\n"

def plot_curves(results: list[dict], path: Path) -> None:
    """Figs. 3-5: S_G, S_D (log scale), Q and D per epoch, a line per pair, its turning point dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(4, 1, figsize=(7, 10), sharex=True)
    for r in results:
        for ax, key in zip(axes, ("S_G", "S_D", "Q", "D")):
            line, = ax.plot([h["epoch"] for h in r["history"]], [h[key] for h in r["history"]], lw=1, label=r["config"])
            if r["turning_point_epoch"] is not None:
                ax.axvline(r["turning_point_epoch"], ls="--", lw=0.8, color=line.get_color())
    for ax, label in zip(axes, ("S_G (rad)", "S_D (rad)", "Q", "D (nats)")):  # symlog: S may be all nan or 0
        ax.set_ylabel(label), ax.set_yscale("symlog" if "rad" in label else "linear", **{"linthresh": 1e-4} if "rad" in label else {})
    axes[0].legend(fontsize=7, ncol=2), axes[3].set_xlabel("epoch")
    fig.tight_layout(), fig.savefig(path, dpi=80), plt.close(fig)

def main() -> None:
    args = parse_args()
    validate(args)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads) if args.threads > 0 else None
    torch.set_float32_matmul_precision({"auto": "high" if device.type == "cuda" else "highest"}.get(args.matmul_precision, args.matmul_precision))
    torch.backends.cudnn.allow_tf32 = torch.get_float32_matmul_precision() != "highest"
    # data, the quality/mode models and their reference values before the run folder: a failure leaves none behind
    data = load_dataset(args.dataset, "train", image_size=args.image_size, root=args.data_root, num_samples=args.num_train or None)
    if len(data) < args.batch_size:
        fail(f"{len(data)} training images are fewer than one batch: lower --batch-size or raise --num-train")
    judge, num_modes, models, real = (face_models if args.dataset == "celeba" else digit_models)(args, device)
    data, real = data.x.to(device), real[:max(args.num_quality, args.num_diversity)]  # uint8 on the device
    noise, monitor = torch.rand(real.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1, SQDMonitor(
        judge, num_modes, args.num_quality, args.num_diversity)  # Q and D of real data and of noise: Table 2's scale
    reference = {"real data (held out)": monitor(real.to(device)), "uniform noise": monitor(noise.to(device))}
    if args.track:
        try:
            import wandb
        except ImportError:
            fail("pip install wandb, or drop --track")
    run_name = args.run_name or f"{args.dataset}__{Path(__file__).stem}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    run_dir = Path(args.resume) if args.resume is not None else Path(args.output_dir) / run_name
    if args.resume is None and run_dir.exists() and any(run_dir.iterdir()):
        fail(f"{run_dir} already exists: choose another --run-name, or continue it with --resume {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "args.json").write_text(json.dumps(asdict(args), indent=2))
    if args.track:
        wandb.init(project=args.wandb_project_name, name=run_dir.name, config=asdict(args), sync_tensorboard=True,
                   dir=str(run_dir), resume="allow", id=run_dir.name)
    header = {"script": Path(__file__).name, "run_name": run_dir.name, "device": str(device), "args": asdict(args),
              "models": models, "reference": reference}
    pairs, results = [(loss, reg) for loss in args.losses for reg in args.regularizers], []
    stop = threading.Event()  # set by Ctrl-C/SIGTERM; the loop stops at the next step boundary
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    for loss, reg in pairs:  # one configuration per call of train(), each into its own folder
        if stop.is_set():
            break
        saved = run_dir / f"{loss}-{reg}" / "results.json"  # train() writes it; TensorBoard's writer makes the folder
        train(args, loss, reg, data, judge, num_modes, saved.parent, device, stop, header)
        results.append(json.loads(saved.read_text()))  # Table 2 is built from what was written
    statuses = [r["status"] for r in results] + ["interrupted"] * (len(pairs) - len(results))
    status = "interrupted" if "interrupted" in statuses else "diverged" if set(statuses) == {"diverged"} else "finished"
    table = summarize(results) if results else "nothing ran\n"
    (run_dir / "table.md").write_text(table)
    write_results(run_dir, {**header, "status": status, "pairs": [r["config"] for r in results]}, table)
    plot_curves(results, run_dir / "sqd_curves.png")
    if status == "interrupted":
        kept = "checkpoint and results so far" if args.save_model else "results so far (no checkpoint: run without --save-model)"
        print(f"interrupted: {kept} in {run_dir}; continue with: python {Path(__file__).name} --resume {run_dir}")
        sys.exit(130)
    print(table)
    if status == "diverged":
        print(f"every pair diverged: see {run_dir}/results.md")
        sys.exit(3)

if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C before the handlers were installed: nothing was trained yet
        print("interrupted before training began; nothing to resume", file=sys.stderr)
        sys.exit(130)
