"""Fréchet distances between generated and real images.

    fid = FID(real_images, extractor="inception", num_samples=10_000, device=device)   # real stats: once, cached
    score = fid.score_generator(generator, fixed_noise)                                 # float
    print(fid.name)   # e.g. "FID[inception-v3-compat, 10000 real / 10000 fake]" — say it next to the number

Two feature extractors:
- "inception": the standard FID network (torch-fidelity's `inception-v3-compat`, TF-ported weights). Where there
  is no network, pass `inception_weights=` the local `inception-2015-12-05-fid.pth`/`weights-inception-…pth`.
- "digits": an in-domain CNN classifier for MNIST-like data (trained on first use on the real training set,
  cached under `{root}/classifiers/`). Its Fréchet distance is *not* comparable with Inception FID; it is
  offline, ~1000× cheaper on a CPU, and its class predictions count modes (Stacked MNIST: 1,000).

Real statistics are cached under `{root}/fid_stats/` keyed by the *bytes* of the real images used, the sample
draw and the extractor, so reusing a dataset name with other data can never return stale statistics.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.datasets import Batches, load_dataset, to_float, to_uint8

INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
DIGIT_DATASETS = ("mnist", "fashion-mnist", "stacked-mnist", "fake")


class FIDError(SystemExit):
    def __init__(self, message: str):
        super().__init__("error: " + message)


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, unbiased) of N×F features."""
    f = np.asarray(features.detach().cpu() if torch.is_tensor(features) else features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need an N×F feature matrix with N ≥ 2, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½.

    tr (Σ1 Σ2)^½ is computed as Σ √λ_i of the symmetric PSD matrix Σ1^½ Σ2 Σ1^½ (same eigenvalues as Σ1 Σ2),
    with eigenvalues clipped at 0: no complex parts to discard, and it holds up for rank-deficient
    covariances (fewer samples than features)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


@contextlib.contextmanager
def full_precision():
    """Metrics in full fp32: TF32 off for matmuls and convolutions, restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---------------------------------------------------------------- in-domain digit classifier

class DigitCNN(nn.Module):
    """Two conv blocks and a 128-unit feature layer (≥ 98% MNIST test accuracy after 3 epochs)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


class DigitClassifier:
    """Wraps a trained DigitCNN. Inputs: uint8 or float in [-1, 1], N×C×H×W with any H×W (resized to 28×28).
    Single-digit data: C = 1 (3 channels are averaged to grey). Stacked MNIST: C = 3, one digit per channel,
    label 100·r + 10·g + b, probabilities the product of the per-channel softmaxes (1,000 classes)."""

    def __init__(self, net: DigitCNN, dataset: str, test_accuracy: float, device):
        self.net, self.dataset, self.test_accuracy = net.to(device).eval(), dataset, test_accuracy
        self.device = torch.device(device)
        self.stacked = dataset == "stacked-mnist"
        self.num_classes = 1000 if self.stacked else net.head.out_features
        self.name = f"digits-cnn({dataset})"

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        x = to_float(x) if x.dtype == torch.uint8 else x.float()
        if x.shape[-1] != 28 or x.shape[-2] != 28:
            x = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
        if self.stacked:
            if x.shape[1] != 3:
                raise ValueError(f"stacked-mnist images have 3 channels, got {x.shape[1]}")
            return x.reshape(-1, 1, 28, 28)  # N·3 single digits, channel-major per image
        return x.mean(1, keepdim=True) if x.shape[1] != 1 else x

    @torch.no_grad()
    def _run(self, x: torch.Tensor, what: str, batch_size: int = 512) -> torch.Tensor:
        outs = []
        with full_precision():
            for i in range(0, len(x), batch_size):
                digits = self._prepare(x[i:i + batch_size])
                out = self.net.body(digits) if what == "features" else self.net(digits).softmax(-1)
                outs.append(out.reshape(-1, 3 * out.shape[-1]) if self.stacked else out)
        return torch.cat(outs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """N×128 penultimate activations (N×384 for stacked: the three digits' features side by side)."""
        return self._run(x, "features")

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """N×K class probabilities (K = 10, or 1,000 for stacked)."""
        p = self._run(x, "probs")
        if not self.stacked:
            return p
        r, g, b = p[:, :10], p[:, 10:20], p[:, 20:]
        return (r[:, :, None, None] * g[:, None, :, None] * b[:, None, None, :]).reshape(len(p), 1000)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        p = self._run(x, "probs")
        if not self.stacked:
            return p.argmax(-1)
        d = p.reshape(len(p), 3, 10).argmax(-1)
        return 100 * d[:, 0] + 10 * d[:, 1] + d[:, 2]


def train_digit_cnn(images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int = 0,
                    batch_size: int = 128, device="cpu") -> DigitCNN:
    torch.manual_seed(seed)
    net = DigitCNN(int(labels.max()) + 1).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = to_float(images.to(device)), labels.to(device)
    if x.shape[-1] != 28:
        x = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
    batches = Batches(x, y, batch_size=min(batch_size, len(x)), generator=torch.Generator(device).manual_seed(seed))
    for _ in range(epochs * batches.steps_per_epoch):
        xb, yb = batches.next()
        loss = F.cross_entropy(net(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


def load_digit_classifier(dataset: str = "mnist", root: str | Path = "data", device="cpu",
                          epochs: int | None = None) -> DigitClassifier:
    """The in-domain classifier for `dataset` (mnist, fashion-mnist, stacked-mnist — which uses the MNIST
    one on each channel — or fake, for tests). Trained on the real training split on first use and cached
    as `{root}/classifiers/{base}_cnn.pt` with its test accuracy."""
    if dataset not in DIGIT_DATASETS:
        raise FIDError(f"the digit extractor covers {', '.join(DIGIT_DATASETS)}, not '{dataset}': "
                       "use the Inception extractor for other data")
    base = "mnist" if dataset == "stacked-mnist" else dataset
    path = Path(root) / "classifiers" / f"{base}_cnn.pt"
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        net = DigitCNN(saved["num_classes"])
        net.load_state_dict(saved["state_dict"])
        return DigitClassifier(net, dataset, saved["test_accuracy"], device)
    train = load_dataset(base, "train", image_size=28, root=root)
    test = load_dataset(base, "test", image_size=28, root=root)
    net = train_digit_cnn(train.x, train.y, epochs=epochs or (3 if base != "fake" else 5), device=device)
    classifier = DigitClassifier(net, base, 0.0, device)
    accuracy = (classifier.predict(test.x).cpu() == test.y).float().mean().item()
    if base == "mnist" and accuracy < 0.98 and len(train) >= 60_000:
        print(f"warning: the MNIST digit classifier reached only {accuracy:.4f} test accuracy (< 0.98)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # per process: two runs training at once do not clash
    torch.save({"state_dict": net.cpu().state_dict(), "num_classes": net.head.out_features,
                "test_accuracy": accuracy}, tmp)
    os.replace(tmp, path)
    return DigitClassifier(net, dataset, accuracy, device)


# ---------------------------------------------------------------- Inception (torch-fidelity)

def load_inception(weights: str | Path | None, device):
    """torch-fidelity's FID Inception (`inception-v3-compat`) returning 2048-d pool features of uint8 N×3×H×W."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    if weights is not None and not Path(weights).exists():
        raise FIDError(f"Inception weights file '{weights}' does not exist. Download {INCEPTION_URL} "
                       "and pass its path, or use the in-domain digit extractor for digit data")
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                          feature_extractor_weights_path=None if weights is None else str(weights))
    except Exception as e:
        if weights is not None:
            raise
        raise FIDError(f"could not download the FID Inception weights ({type(e).__name__}). Download "
                       f"{INCEPTION_URL} on a machine with network and pass the file's path as the script's "
                       "Inception-weights option (or put it in ~/.cache/torch/hub/checkpoints/)") from None
    return net.to(device).eval()


class FID:
    """Fréchet distance of generated images to a fixed set of real images (see the module docstring)."""

    def __init__(self, real_images: torch.Tensor, extractor: str = "inception", num_samples: int | None = None,
                 root: str | Path = "data", inception_weights: str | Path | None = None, device="cpu",
                 batch_size: int = 64, dataset: str | None = None, seed: int = 0, replace: bool = False):
        if extractor not in ("inception", "digits"):
            raise FIDError(f"unknown FID extractor '{extractor}': use 'inception' or 'digits'")
        if num_samples is not None and num_samples < 2:
            raise FIDError(f"FID needs at least 2 samples, got {num_samples}")
        if not replace and num_samples is not None and num_samples > len(real_images):
            raise FIDError(f"asked for {num_samples} real FID samples without replacement but the data has "
                           f"{len(real_images)}: lower the FID sample count")
        self.device, self.batch_size, self.extractor = torch.device(device), batch_size, extractor
        if extractor == "digits":
            if dataset is None:
                raise FIDError("the digit extractor needs the dataset name (mnist, fashion-mnist, stacked-mnist)")
            self.classifier = load_digit_classifier(dataset, root, device)
            self.extractor_name = self.classifier.name
        else:
            self.net = load_inception(inception_weights, self.device)
            self.extractor_name = "inception-v3-compat"
        n = len(real_images) if num_samples is None else num_samples
        gen = torch.Generator().manual_seed(seed)
        index = (torch.randint(len(real_images), (n,), generator=gen) if replace
                 else torch.randperm(len(real_images), generator=gen)[:n])
        real = real_images.cpu()[index]
        real = real if real.dtype == torch.uint8 else to_uint8(real)
        self.num_real, self.num_fake = n, n
        digest = hashlib.sha256(real.numpy().tobytes())
        digest.update(f"{tuple(real.shape)}|{self.extractor_name}|{n}|{seed}|{replace}".encode())
        cache = Path(root) / "fid_stats" / f"{digest.hexdigest()[:32]}.npz"
        if cache.exists():
            saved = np.load(cache)
            self.mu_real, self.sigma_real = saved["mu"], saved["sigma"]
        else:
            self.mu_real, self.sigma_real = feature_stats(self.features(real))
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
            np.savez(tmp, mu=self.mu_real, sigma=self.sigma_real)
            os.replace(tmp, cache)
        self.cache_path = cache

    @property
    def name(self) -> str:
        return f"FID[{self.extractor_name}, {self.num_real} real / {self.num_fake} fake]"

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Features of uint8 or [-1, 1] float images N×C×H×W, in fixed-size batches, full precision."""
        if images.dtype != torch.uint8:
            images = to_uint8(images)
        if self.extractor == "digits":
            return self.classifier.features(images).cpu()
        out = []
        with full_precision():
            for i in range(0, len(images), self.batch_size):
                batch = images[i:i + self.batch_size].to(self.device)
                if batch.shape[1] == 1:
                    batch = batch.repeat(1, 3, 1, 1)
                out.append(self.net(batch)[0].double().cpu())
        return torch.cat(out)

    def __call__(self, fake_images: torch.Tensor) -> float:
        mu, sigma = feature_stats(self.features(fake_images))
        self.num_fake = len(fake_images)
        return frechet_distance(mu, sigma, self.mu_real, self.sigma_real)

    @torch.no_grad()
    def score_generator(self, generator: nn.Module, noise: torch.Tensor, batch_size: int | None = None) -> float:
        """FID of generator(noise) over a fixed noise tensor, in eval mode (the previous mode is restored):
        batch-norm layers use their running statistics, as a trained generator is used."""
        was_training = generator.training
        generator.eval()
        try:
            step = batch_size or self.batch_size
            fake = torch.cat([to_uint8(generator(noise[i:i + step])).cpu() for i in range(0, len(noise), step)])
        finally:
            generator.train(was_training)
        return self(fake)
