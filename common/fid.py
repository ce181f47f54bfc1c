"""Image-quality metrics of generated images against a fixed set of real images, always in full precision.

    fid = FID(real_images, extractor="inception", num_samples=10_000, device=device)  # real features: once, cached
    m = fid.evaluate_generator(generator, fixed_noise)   # {"fid", "kid_mean", "kid_std", "precision", "recall",
                                                          #  "is_mean", "is_std", "extractor", "num_real", ...}
    score = fid.score_generator(generator, fixed_noise)  # FID only (float): cheap enough for every epoch
    print(fid.name)   # e.g. "FID[inception-v3-compat, 10000 real / 10000 fake]" — say it next to the number

Metrics (see docs/metrics.md): FID is the Fréchet distance of Gaussians fitted to the features; KID (mean ± std
over random subsets), precision/recall (k-NN balls, k = 3) and the Inception Score come from torch-fidelity
0.4's own functions (`kid_features_to_metric`, `prc_features_to_metric`, `isc_features_to_metric`) applied to
the features we extract, with torch-fidelity's defaults (100 KID subsets of min(1000, n) samples, cubic
polynomial kernel, 10 IS splits, seed 2020).

Two feature extractors:
- "inception": the standard FID network (torch-fidelity's `inception-v3-compat`, TF-ported weights): 2048-d pool
  features and the `logits_unbiased` that IS needs, from one forward pass. Where there is no network, pass
  `inception_weights=` the local `inception-2015-12-05-fid.pth`/`weights-inception-…pth`. FID-only weight files
  zero the classifier head: then there is no IS (said once, at construction), the other metrics are unaffected.
- "digits": an in-domain CNN classifier for MNIST-like data (trained on first use on the real training set,
  cached under `{root}/classifiers/`). Its FID, KID and precision/recall live in its own 128-d feature space
  (the extractor name, e.g. "digits-cnn(mnist)", says so): *not* comparable with Inception numbers; no IS. It is
  offline, ~1000× cheaper on a CPU, and its class predictions count modes (Stacked MNIST: 1,000).

Caches never hand back a value computed from other inputs: real features are cached under `{root}/fid_stats/`
keyed by a digest of the extractor's weights, its input size and code version, the bytes of the real images
drawn, their count, the draw (with/without replacement) and its seed; the digit classifier by its training and
test data and its training recipe. A cache file that cannot be read is rebuilt with one line saying so.

Full precision: every metric runs inside `full_precision()` (float32 matmuls at "highest", TF32 off), and
point-to-centre distances go through `sq_distances` (float64, difference form), whatever the training uses.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.datasets import Batches, load_dataset, to_float, to_uint8

INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
DIGIT_DATASETS = ("mnist", "fashion-mnist", "stacked-mnist", "fake")
BAR_INTERVAL = 0.1 if sys.stderr.isatty() else 30.0  # seconds between redraws: a log file gets a line every 30 s
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000   # torch-fidelity's defaults; the subset size shrinks to the sample count
ISC_SPLITS, PRC_NEIGHBORHOOD, METRIC_SEED = 10, 3, 2020
CACHE_VERSION = 2          # bump when the cached content or its meaning changes
LONG_JOB_SECONDS = 60      # on a CPU, announce feature extractions estimated to take longer than this


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
    root1 = psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_from_features(features, mu2, sigma2, sqrt_sigma2: np.ndarray | None = None) -> float:
    """`frechet_distance(*feature_stats(features), mu2, sigma2)` without forming a d×d eigenproblem when there
    are fewer samples than features: with A the centred n×d features, Σ1 = AᵀA/(n−1) and the nonzero eigenvalues
    of Σ2^½ Σ1 Σ2^½ = BᵀB/(n−1) (B = A Σ2^½) are those of B Bᵀ/(n−1) = A Σ2 Aᵀ/(n−1), an n×n matrix. With n ≥ d
    it is the d×d path, reusing `sqrt_sigma2` (the fixed real statistics' root) when given."""
    f = np.asarray(features.detach().cpu() if torch.is_tensor(features) else features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need an N×F feature matrix with N ≥ 2, got shape {f.shape}")
    n, d = f.shape
    mu1 = f.mean(0)
    a = f - mu1
    if n - 1 < d:
        middle = a @ sigma2 @ a.T / (n - 1)
        trace1 = float((a * a).sum()) / (n - 1)
    else:
        root2 = psd_sqrt(sigma2) if sqrt_sigma2 is None else sqrt_sigma2
        sigma1 = a.T @ a / (n - 1)
        middle = root2 @ sigma1 @ root2
        trace1 = float(np.trace(sigma1))
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - np.asarray(mu2, np.float64)
    return float(diff @ diff + trace1 + np.trace(sigma2) - 2 * trace_sqrt)


def _precision_spots() -> list:
    """torch's per-backend fp32 precision settings (newer API), parents before children, where they exist."""
    b, spots = torch.backends, []
    for path in ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul", "mkldnn.conv",
                 "mkldnn.rnn"):
        obj = b
        for part in filter(None, path.split(".")):
            obj = getattr(obj, part, None)
        if obj is not None and isinstance(getattr(obj, "fp32_precision", None), str):
            spots.append((path, obj))
    return spots


def _try(read):
    try:
        return read()
    except RuntimeError:  # torch refuses to answer a legacy question when the settings were mixed with the new API
        return None


@contextlib.contextmanager
def full_precision():
    """Metrics in full fp32 whatever the caller chose for training: float32 matmul precision "highest" (on a CPU
    "medium" runs float32 matmuls through bfloat16; on CUDA "high"/"medium" use TF32), TF32 off for cuBLAS and
    cuDNN, IEEE fp32 for oneDNN convolutions. Every setting (legacy flags and torch's per-backend precisions) is
    restored on exit, also after an exception."""
    b = torch.backends
    spots = _precision_spots()
    saved = [obj.fp32_precision for _, obj in spots]
    matmul = _try(torch.get_float32_matmul_precision)
    legacy_matmul, legacy_cudnn = _try(lambda: b.cuda.matmul.allow_tf32), _try(lambda: b.cudnn.allow_tf32)
    try:
        torch.set_float32_matmul_precision("highest")
        if legacy_matmul is not None:  # the legacy setters only where the legacy view is readable: never mix the APIs
            b.cuda.matmul.allow_tf32 = False
        if legacy_cudnn is not None:
            b.cudnn.allow_tf32 = False
        values = {path: obj.fp32_precision for path, obj in spots}
        for path, obj in spots:  # a leaf left at "none" inherits its parent's choice: make every leaf IEEE in effect
            chain = [values.get(path), values.get(path.split(".")[0]), values.get("")]
            effective = next((v for v in chain if v not in (None, "none")), "ieee")
            if "." in path and effective != "ieee":
                obj.fp32_precision = "ieee"
        yield
    finally:
        if matmul is not None:
            torch.set_float32_matmul_precision(matmul)
        if legacy_matmul is not None and _try(lambda: b.cuda.matmul.allow_tf32) != legacy_matmul:
            b.cuda.matmul.allow_tf32 = legacy_matmul
        if legacy_cudnn is not None and _try(lambda: b.cudnn.allow_tf32) != legacy_cudnn:
            b.cudnn.allow_tf32 = legacy_cudnn
        for (_, obj), value in zip(spots, saved):  # parents first: setting a parent resets its children
            if obj.fp32_precision != value:
                obj.fp32_precision = value


def sq_distances(a, b, chunk_elements: int = 1 << 24) -> torch.Tensor:
    """Squared Euclidean distances ‖a_i − b_j‖² in float64 from the differences themselves (…×N×D, …×M×D →
    …×N×M, leading dimensions broadcast), on a's device. Unlike `torch.cdist`, whose matmul form
    ‖a‖² + ‖b‖² − 2 a·b cancels catastrophically for points far from the origin (and runs through TF32 or
    bfloat16 where those are on), this is exact to float64 rounding wherever the points are."""
    a = torch.as_tensor(a)
    b = torch.as_tensor(b).to(a.device, torch.float64)
    a = a.to(torch.float64)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"points of different dimensions: {tuple(a.shape)} and {tuple(b.shape)}")
    rows = max(1, chunk_elements // max(1, b.shape[-2] * b.shape[-1]))
    out = [((a[..., i:i + rows, None, :] - b[..., None, :, :]) ** 2).sum(-1) for i in range(0, a.shape[-2], rows)]
    return torch.cat(out, dim=-2) if out else a.new_zeros(*a.shape[:-1], b.shape[-2])


def state_digest(net: nn.Module) -> str:
    """sha256 of a network's state dict (names, dtypes, shapes and bytes): any changed weight changes it."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tensor_digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def unreadable(path: Path, error: Exception) -> None:
    """The one line printed when a cache file cannot be read (it is then rebuilt)."""
    print(f"cache file {path} could not be read ({type(error).__name__}): rebuilding it")


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


DIGIT_RECIPE = {"arch": "DigitCNN(conv32-conv64-fc128)", "optimizer": "adam", "lr": 1e-3, "batch_size": 128,
                "seed": 0, "input": "28x28 bilinear-antialias"}


def train_digit_cnn(images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int = 0,
                    batch_size: int = 128, device="cpu", progress: bool = True) -> DigitCNN:
    """Adam (lr 1e-3) on cross-entropy, in full precision (the result must not depend on the caller's precision
    settings: it is cached by its inputs), with a progress bar."""
    torch.manual_seed(seed)
    net = DigitCNN(int(labels.max()) + 1).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=DIGIT_RECIPE["lr"])
    x, y = to_float(images.to(device)), labels.to(device)
    if x.shape[-1] != 28:
        x = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
    batches = Batches(x, y, batch_size=min(batch_size, len(x)), generator=torch.Generator(device).manual_seed(seed))
    steps = epochs * batches.steps_per_epoch
    with full_precision(), tqdm(total=steps, desc=f"training the digit classifier ({epochs} epochs)", unit="step",
                                disable=not progress, leave=False, mininterval=BAR_INTERVAL) as bar:
        for step in range(steps):
            xb, yb = batches.next()
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return net.eval()


def load_digit_classifier(dataset: str = "mnist", root: str | Path = "data", device="cpu",
                          epochs: int | None = None, progress: bool = True) -> DigitClassifier:
    """The in-domain classifier for `dataset` (mnist, fashion-mnist, stacked-mnist — which uses the MNIST
    one on each channel — or fake, for tests). Trained on the real training split on first use and cached
    as `{root}/classifiers/{base}_cnn_{key}.pt` with its test accuracy, where the key digests the training
    and test images and labels and the training recipe (architecture, optimiser, epochs, batch, seed): other
    data or another recipe gives another file, never a stale classifier."""
    if dataset not in DIGIT_DATASETS:
        raise FIDError(f"the digit extractor covers {', '.join(DIGIT_DATASETS)}, not '{dataset}': "
                       "use the Inception extractor for other data")
    base = "mnist" if dataset == "stacked-mnist" else dataset
    train = load_dataset(base, "train", image_size=28, root=root)
    test = load_dataset(base, "test", image_size=28, root=root)
    epochs = epochs or (3 if base != "fake" else 5)
    recipe = dict(DIGIT_RECIPE, epochs=epochs, version=CACHE_VERSION)
    key = hashlib.sha256((tensor_digest(train.x, train.y, test.x, test.y) + repr(sorted(recipe.items()))).encode())
    path = Path(root) / "classifiers" / f"{base}_cnn_{key.hexdigest()[:20]}.pt"
    if path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            net = DigitCNN(saved["num_classes"])
            net.load_state_dict(saved["state_dict"])
            return DigitClassifier(net, dataset, saved["test_accuracy"], device)
        except Exception as e:  # truncated or foreign file: train again
            unreadable(path, e)
    net = train_digit_cnn(train.x, train.y, epochs=epochs, seed=recipe["seed"], batch_size=recipe["batch_size"],
                          device=device, progress=progress)
    classifier = DigitClassifier(net, base, 0.0, device)
    accuracy = (classifier.predict(test.x).cpu() == test.y).float().mean().item()
    if base == "mnist" and accuracy < 0.98 and len(train) >= 60_000:
        print(f"warning: the MNIST digit classifier reached only {accuracy:.4f} test accuracy (< 0.98)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # per process: two runs training at once do not clash
    torch.save({"state_dict": net.cpu().state_dict(), "num_classes": net.head.out_features,
                "test_accuracy": accuracy, "recipe": repr(recipe)}, tmp)
    os.replace(tmp, path)
    return DigitClassifier(net.to(device), dataset, accuracy, device)


# ---------------------------------------------------------------- Inception (torch-fidelity)

def load_inception(weights: str | Path | None, device):
    """torch-fidelity's FID Inception (`inception-v3-compat`) returning, for uint8 N×3×H×W, the 2048-d pool
    features (FID, KID, precision/recall) and `logits_unbiased` (IS) from one forward pass."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    if weights is not None and not Path(weights).exists():
        raise FIDError(f"Inception weights file '{weights}' does not exist. Download {INCEPTION_URL} "
                       "and pass its path, or use the in-domain digit extractor for digit data")
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=None if weights is None else str(weights))
    except Exception as e:
        if weights is not None:
            raise FIDError(f"could not read the Inception weights file '{weights}' ({type(e).__name__}: {e}). "
                           f"Download {INCEPTION_URL} again") from None
        raise FIDError(f"could not download the FID Inception weights ({type(e).__name__}). Download "
                       f"{INCEPTION_URL} on a machine with network and pass the file's path as the script's "
                       "Inception-weights option (or put it in ~/.cache/torch/hub/checkpoints/)") from None
    return net.to(device).eval()


def format_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class FID:
    """Metrics of generated images against a fixed set of real images (see the module docstring)."""

    def __init__(self, real_images: torch.Tensor, extractor: str = "inception", num_samples: int | None = None,
                 root: str | Path = "data", inception_weights: str | Path | None = None, device="cpu",
                 batch_size: int = 64, dataset: str | None = None, seed: int = 0, replace: bool = False,
                 progress: bool = True):
        if extractor not in ("inception", "digits"):
            raise FIDError(f"unknown FID extractor '{extractor}': use 'inception' or 'digits'")
        if num_samples is not None and num_samples < 2:
            raise FIDError(f"FID needs at least 2 samples, got {num_samples}")
        if not replace and num_samples is not None and num_samples > len(real_images):
            raise FIDError(f"asked for {num_samples} real FID samples without replacement but the data has "
                           f"{len(real_images)}: lower the FID sample count")
        self.device, self.batch_size, self.extractor = torch.device(device), batch_size, extractor
        self.progress, self._announced, self._sqrt_sigma_real = progress, False, None
        self.has_classifier = False  # whether IS can be computed (Inception with a non-zero classifier head)
        if extractor == "digits":
            if dataset is None:
                raise FIDError("the digit extractor needs the dataset name (mnist, fashion-mnist, stacked-mnist)")
            self.classifier = load_digit_classifier(dataset, root, device, progress=progress)
            self.extractor_name = self.classifier.name
            weights, input_size = state_digest(self.classifier.net), 28
        else:
            import torch_fidelity
            self.net = load_inception(inception_weights, self.device)
            self.extractor_name = "inception-v3-compat"
            weights = state_digest(self.net) + f"|torch-fidelity {torch_fidelity.__version__}"
            input_size = self.net.INPUT_IMAGE_SIZE
            self.has_classifier = bool(self.net.fc.weight.detach().abs().sum() > 0)
            if not self.has_classifier:  # FID-only weight files zero the 1008-way head: IS would read exactly 1.0
                print(f"note: the Inception weights{'' if inception_weights is None else f' in {inception_weights}'}"
                      " have no classifier (fc weights all zero, as in FID-only files), so no Inception Score is "
                      "reported; FID, KID and precision/recall are unaffected. torch-fidelity's "
                      "weights-inception-2015-12-05-6726825d.pth has the classifier")
        n = len(real_images) if num_samples is None else num_samples
        gen = torch.Generator().manual_seed(seed)
        index = (torch.randint(len(real_images), (n,), generator=gen) if replace
                 else torch.randperm(len(real_images), generator=gen)[:n])
        self.real_index = index  # which real images, in which order (KID's random subsets depend on the order)
        real = real_images.cpu()[index]
        real = real if real.dtype == torch.uint8 else to_uint8(real)
        self.num_real, self.num_fake = n, n
        key = hashlib.sha256(tensor_digest(real).encode())
        key.update(f"|{self.extractor_name}|weights {weights}|input {input_size}|n {n}|seed {seed}|"
                   f"replace {replace}|v{CACHE_VERSION}".encode())
        self.cache_path = Path(root) / "fid_stats" / f"{key.hexdigest()[:32]}.npz"
        if not self._load_real(self.cache_path):
            features, _ = self._extract(real, "real")
            self.real_features = features
            self.mu_real, self.sigma_real = feature_stats(features)
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_path.with_name(f"{self.cache_path.stem}.{os.getpid()}.tmp.npz")
            np.savez(tmp, features=features.numpy(), mu=self.mu_real, sigma=self.sigma_real)
            os.replace(tmp, self.cache_path)

    def _load_real(self, path: Path) -> bool:
        if not path.exists():
            return False
        try:
            with np.load(path) as saved:
                features, mu, sigma = saved["features"], saved["mu"], saved["sigma"]
            if features.shape[0] != self.num_real or mu.shape != features.shape[1:] or sigma.shape != 2 * mu.shape:
                raise ValueError(f"shapes {features.shape}, {mu.shape}, {sigma.shape}")
        except Exception as e:
            unreadable(path, e)
            return False
        self.real_features, self.mu_real, self.sigma_real = torch.from_numpy(features), mu, sigma
        return True

    @property
    def name(self) -> str:
        return f"FID[{self.extractor_name}, {self.num_real} real / {self.num_fake} fake]"

    @torch.no_grad()
    def _extract(self, images: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """float32 features (and Inception's logits_unbiased, else None) of uint8 or [-1, 1] float N×C×H×W
        images, in fixed-size batches, full precision, with a progress bar; on a CPU, a long job first says how
        long it will take and how to shorten it."""
        if images.dtype != torch.uint8:
            images = to_uint8(images)
        step = self.batch_size if self.extractor == "inception" else 512
        feats, logits = [], []

        def run(batch):
            batch = batch.to(self.device)
            if self.extractor == "digits":
                feats.append(self.classifier.features(batch).float().cpu())
            else:
                f, l = self.net(batch.repeat(1, 3, 1, 1) if batch.shape[1] == 1 else batch)
                feats.append(f.float().cpu())
                if self.has_classifier:
                    logits.append(l.float().cpu())

        label = "Inception" if self.extractor == "inception" else self.extractor_name
        with full_precision():
            start = time.perf_counter()
            run(images[:step])  # the first batch times the job, before the bar starts
            if len(images) > step:
                self._announce(min(step, len(images)) / (time.perf_counter() - start), len(images), what)
            with tqdm(total=len(images), initial=min(step, len(images)), desc=f"{label} features ({what})",
                      unit="img", disable=not self.progress, leave=what == "real", mininterval=BAR_INTERVAL) as bar:
                for i in range(step, len(images), step):
                    run(images[i:i + step])
                    bar.update(len(images[i:i + step]))
        return torch.cat(feats), (torch.cat(logits) if logits else None)

    def _announce(self, rate: float, n: int, what: str) -> None:
        """One line before a long feature extraction on a CPU (measured on the first batch)."""
        if self.device.type != "cpu" or self._announced or n / rate < LONG_JOB_SECONDS:
            return
        self._announced = True
        label = "Inception" if self.extractor == "inception" else self.extractor_name
        shorter = "fewer samples (--fid-samples)" + (" or --fid-extractor digits (digit data)"
                                                      if self.extractor == "inception" else "")
        print(f"note: {label} features run at {rate:.1f} images/s on this CPU: the {n} {what} images take about "
              f"{format_seconds(n / rate)}" + (f", and each evaluation of {self.num_fake} generated images about "
                                               f"{format_seconds(self.num_fake / rate)}" if what == "real" else "")
              + f". To shorten it use {shorter}", flush=True)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """float32 features of uint8 or [-1, 1] float images N×C×H×W (2048-d Inception pool features, or the
        digit classifier's 128-d penultimate layer — 384-d for Stacked MNIST)."""
        return self._extract(images, "generated")[0]

    def __call__(self, fake_images: torch.Tensor) -> float:
        """FID only (cheap: no KID, precision/recall or IS)."""
        features = self.features(fake_images)
        self.num_fake = len(features)
        return self.frechet(features)

    def frechet(self, features: torch.Tensor) -> float:
        """FID of generated features against the real statistics (the real root is computed once)."""
        if len(features) - 1 >= features.shape[1] and self._sqrt_sigma_real is None:
            self._sqrt_sigma_real = psd_sqrt(self.sigma_real)
        return frechet_distance_from_features(features, self.mu_real, self.sigma_real, self._sqrt_sigma_real)

    def evaluate(self, fake_images: torch.Tensor) -> dict:
        """FID, KID, precision/recall (and IS for Inception) of the generated images, all in full precision."""
        features, logits = self._extract(fake_images, "generated")
        return self.metrics_from_features(features, logits)

    def metrics_from_features(self, features: torch.Tensor, logits: torch.Tensor | None = None) -> dict:
        from torch_fidelity.metric_isc import isc_features_to_metric
        from torch_fidelity.metric_kid import kid_features_to_metric
        from torch_fidelity.metric_prc import prc_features_to_metric
        n = len(features)
        if n < 2:
            raise FIDError(f"metrics need at least 2 generated samples, got {n}")
        self.num_fake = n
        subset = min(KID_SUBSET_SIZE, n, self.num_real)
        # float32 features, as torch-fidelity's calculate_metrics passes them (its KID kernel then runs in float32
        # numpy and its k-NN distances in float32 torch.cdist — inside full_precision, so never TF32/bfloat16):
        # the numbers are torch-fidelity's numbers for these features
        fake, real = features.float().cpu(), self.real_features.float()
        out = {"fid": self.frechet(features)}
        with full_precision():
            kid = kid_features_to_metric(fake, real, kid_subsets=KID_SUBSETS, kid_subset_size=subset,
                                         rng_seed=METRIC_SEED, verbose=False)
            out["kid_mean"], out["kid_std"] = kid["kernel_inception_distance_mean"], kid["kernel_inception_distance_std"]
            if min(n, self.num_real) > PRC_NEIGHBORHOOD:
                prc = prc_features_to_metric(fake, real, prc_neighborhood=PRC_NEIGHBORHOOD, prc_batch_size=10_000,
                                             save_cpu_ram=False, verbose=False)
                out["precision"], out["recall"] = float(prc["precision"]), float(prc["recall"])
            else:
                out["precision"] = out["recall"] = float("nan")
            if logits is not None:
                isc = isc_features_to_metric(logits.cpu(), splits=min(ISC_SPLITS, n), shuffle=True,
                                             rng_seed=METRIC_SEED)
                out["is_mean"], out["is_std"] = isc["inception_score_mean"], isc["inception_score_std"]
                out["is_splits"] = min(ISC_SPLITS, n)
        out.update(extractor=self.extractor_name, num_real=self.num_real, num_fake=n, kid_subsets=KID_SUBSETS,
                   kid_subset_size=subset)
        return out

    @torch.no_grad()
    def generate(self, generator: nn.Module, noise: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """uint8 images generator(noise) in eval mode (the previous mode is restored): batch-norm layers use their
        running statistics, as a trained generator is used. In full precision too, so that the caller's training
        precision does not change the images that are scored."""
        was_training = generator.training
        generator.eval()
        try:
            with full_precision():
                step = batch_size or self.batch_size
                return torch.cat([to_uint8(generator(noise[i:i + step])).cpu() for i in range(0, len(noise), step)])
        finally:
            generator.train(was_training)

    def score_generator(self, generator: nn.Module, noise: torch.Tensor, batch_size: int | None = None) -> float:
        """FID of generator(noise) over a fixed noise tensor, in eval mode (see `generate`)."""
        return self(self.generate(generator, noise, batch_size))

    def evaluate_generator(self, generator: nn.Module, noise: torch.Tensor, batch_size: int | None = None) -> dict:
        """`evaluate` of generator(noise) over a fixed noise tensor, in eval mode (see `generate`)."""
        return self.evaluate(self.generate(generator, noise, batch_size))
