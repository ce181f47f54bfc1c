"""Datasets as tensors, loaded the same way by every script.

    data = load_dataset("mnist", image_size=32)        # Data(x=uint8 N×1×32×32, y=int64 N, ...)
    real = to_float(data.x.to(device))                 # float32 in [-1, 1], kept on the device
    batches = Batches(real, batch_size=64, generator=torch.Generator(device).manual_seed(0))
    (x,) = batches.next()                              # one shuffled batch, selected by index

Image sets come back as uint8 N×C×H×W tensors, resized/cropped once and cached under
`{root}/cache/` so that later loads are a single `torch.load`. Files follow torchvision's layout
(`{root}/MNIST/raw/…`, `{root}/cifar-10-batches-py/…`, `{root}/celeba/…`); where they are missing the
loader tries torchvision's download and, when that fails (no network), stops with one message that
says which files to fetch, from where, and where to put them.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATASET_NAMES = ("mnist", "fashion-mnist", "cifar10", "stacked-mnist", "celeba", "lsun-classroom",
                 "lsun-conference", "lfw", "ring", "fake")
NATIVE_SIZE = {"mnist": 28, "fashion-mnist": 28, "cifar10": 32, "stacked-mnist": 28, "celeba": 64,
               "lsun-classroom": 64, "lsun-conference": 64, "lfw": 64, "fake": 32, "folder": 64}
CELEBA_CROP = 108  # centre crop of the 178×218 aligned faces before resizing (the DCGAN-era convention)
LFW_CROP = 150     # centre crop of the 250×250 LFW images (the face fills the middle ~150 pixels)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class DatasetError(SystemExit):
    """Missing files, an unknown name or a bad size. A SystemExit, so an uncaught one ends a script
    with exit code 1 and this message only, not a traceback."""

    def __init__(self, message: str):
        super().__init__("error: " + message)


@dataclass
class Data:
    x: torch.Tensor               # uint8 N×C×H×W images, or float32 N×2 points for "ring"
    y: torch.Tensor | None        # int64 labels (class, 3-digit mode, identity, ring mode) or None
    num_classes: int | None
    name: str
    split: str

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class RingData:
    train: torch.Tensor        # 50,000×2 points
    test: torch.Tensor         # 25,000×2 points
    train_noise: torch.Tensor  # 50,000×2 N(0, I) generator inputs
    test_noise: torch.Tensor   # 25,000×2 N(0, I): the fixed evaluation noise
    train_modes: torch.Tensor  # int64 mode index of each train point
    test_modes: torch.Tensor
    centers: torch.Tensor      # 8×2 means (cos 2πi/8, sin 2πi/8), i = 1..8
    std: float


def ring_data(num_modes: int = 8, std: float = 0.01, num_train: int = 50_000, num_test: int = 25_000) -> RingData:
    """The 2-D ring of paper 001: a mixture of `num_modes` Gaussians on the unit circle. Every set (points and
    generator noise) is drawn once from seed 1, so all runs and seeds see the same data."""
    gen = torch.Generator().manual_seed(1)
    i = torch.arange(1, num_modes + 1, dtype=torch.float64)
    centers = torch.stack([torch.cos(2 * math.pi * i / num_modes), torch.sin(2 * math.pi * i / num_modes)], 1)

    def draw(n):
        modes = torch.randint(num_modes, (n,), generator=gen)
        return (centers[modes] + std * torch.randn(n, 2, generator=gen, dtype=torch.float64)).float(), modes

    train, train_modes = draw(num_train)
    test, test_modes = draw(num_test)
    train_noise = torch.randn(num_train, 2, generator=gen)
    test_noise = torch.randn(num_test, 2, generator=gen)
    return RingData(train, test, train_noise, test_noise, train_modes, test_modes, centers.float(), std)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images → float32 in [-1, 1] on the same device."""
    return x.float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float images in [-1, 1] → uint8 (clamped, rounded)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round_().to(torch.uint8)


class Batches:
    """Shuffled mini-batches of tensors that already live on the training device, selected by index.

    One permutation per epoch is drawn on the tensors' device from `generator`; `next()` crosses epoch
    boundaries by itself. `state_dict()` holds the permutation, position and generator state, so a resumed
    run sees the same batches as an uninterrupted one."""

    def __init__(self, *tensors: torch.Tensor, batch_size: int, generator: torch.Generator | None = None,
                 drop_last: bool = True):
        if not tensors or any(len(t) != len(tensors[0]) for t in tensors):
            raise ValueError("Batches needs one or more tensors of equal length")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        n = len(tensors[0])
        if drop_last and n < batch_size:
            raise DatasetError(f"the dataset has {n} samples, fewer than one batch of {batch_size}: "
                               "lower --batch-size or use more data")
        self.tensors, self.batch_size, self.generator = tensors, batch_size, generator
        self.device = tensors[0].device
        self.steps_per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
        self.epoch, self.step_in_epoch = 0, 0
        self._perm = self._new_permutation()

    def _new_permutation(self) -> torch.Tensor:
        return torch.randperm(len(self.tensors[0]), device=self.device, generator=self.generator)

    def next(self) -> tuple[torch.Tensor, ...]:
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self._perm = self._new_permutation()
        start = self.step_in_epoch * self.batch_size
        idx = self._perm[start:start + self.batch_size]
        self.step_in_epoch += 1
        return tuple(t[idx] for t in self.tensors)

    def iter_epoch(self):
        """The batches of one epoch: the rest of the current one, or a whole new one at an epoch boundary."""
        for _ in range(self.steps_per_epoch - self.step_in_epoch or self.steps_per_epoch):
            yield self.next()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "perm": self._perm.cpu(),
                "generator": None if self.generator is None else self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self._perm = state["perm"].to(self.device)
        if self.generator is not None and state["generator"] is not None:
            self.generator.set_state(state["generator"])


# ---------------------------------------------------------------- preparing images

def resize_square(x: torch.Tensor, size: int, crop: int | None = None, chunk: int = 2048) -> torch.Tensor:
    """uint8 N×C×H×W → uint8 N×C×size×size: optional centre crop to `crop`, then a centre crop to a square
    and an antialiased bilinear resize. Done in chunks to bound memory."""
    if crop is not None:
        x = centre_crop(x, min(crop, x.shape[-2], x.shape[-1]))
    x = centre_crop(x, min(x.shape[-2:]))
    if x.shape[-1] == size:
        return x.contiguous()
    out = torch.empty(len(x), x.shape[1], size, size, dtype=torch.uint8)
    for i in range(0, len(x), chunk):
        part = F.interpolate(x[i:i + chunk].float(), size=(size, size), mode="bilinear", antialias=True,
                             align_corners=False)
        out[i:i + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def centre_crop(x: torch.Tensor, side: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - side) // 2, (w - side) // 2
    return x[..., top:top + side, left:left + side]


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST's format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file: delete it and fetch it again")
    ndim = data[3]
    shape = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def read_images(paths: list, size: int, crop: int | None) -> torch.Tensor:
    """Decode image files (paths or file objects) with PIL (threads: decoding releases the GIL) into uint8 N×3×size×size."""
    from PIL import Image

    def load(path):
        with Image.open(path) as img:
            arr = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
        return resize_square(arr[None], size, crop)[0]

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        images = list(pool.map(load, paths, chunksize=64))
    if not images:
        raise DatasetError("no images found")
    return torch.stack(images)


def missing(name: str, expected: list[Path], source: str, extra: str = "") -> DatasetError:
    files = "\n".join(f"  {p}" for p in expected)
    return DatasetError(f"dataset '{name}' is not on this machine and could not be downloaded.\n"
                        f"Expected:\n{files}\nGet it from {source} and put the files at the paths above"
                        f"{extra}, or pass --data-root pointing at a folder that has them.")


def try_download(fetch, cleanup: list[Path]) -> bool:
    """Run a download; on failure delete whatever it left under the `cleanup` paths that was not there before."""
    before = {p: set(p.rglob("*")) if p.exists() else None for p in cleanup}
    new_parents = {p.parent for p in cleanup if not p.parent.exists()}
    try:
        fetch()
        return True
    except Exception:  # no network, a dead mirror, a bad checksum: all mean "not here"
        for p, old in before.items():
            if not p.exists():
                continue
            if old is None:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                continue
            for f in sorted(set(p.rglob("*")) - old, reverse=True):
                shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)
        for parent in new_parents:  # the download created the data root itself: remove it if left empty
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
        return False


def find_idx(raw: Path, stem: str) -> Path | None:
    for candidate in (raw / f"{stem}.gz", raw / stem):
        if candidate.exists():
            return candidate
    return None


def load_mnist_like(name: str, split: str, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    folder = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[name]
    raw = root / folder / "raw"
    prefix = "train" if split == "train" else "t10k"
    stems = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    paths = [find_idx(raw, s) for s in stems]
    if None in paths and download:
        import torchvision
        cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
        try_download(lambda: cls(str(root), train=split == "train", download=True), [root / folder])
        paths = [find_idx(raw, s) for s in stems]
    if None in paths:
        site = ("http://yann.lecun.com/exdb/mnist/ (or any MNIST mirror)" if name == "mnist"
                else "https://github.com/zalandoresearch/fashion-mnist (data/fashion)")
        raise missing(name, [raw / f"{s}.gz" for s in stems], site)
    images, labels = (read_idx(p) for p in paths)
    return torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64))


def load_cifar10(split: str, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    folder = root / "cifar-10-batches-py"
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if not all((folder / f).exists() for f in files) and download:
        import torchvision
        try_download(lambda: torchvision.datasets.CIFAR10(str(root), train=split == "train", download=True),
                     [folder, root / "cifar-10-python.tar.gz"])
    if not all((folder / f).exists() for f in files):
        raise missing("cifar10", [folder / f for f in files],
                      "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                      f" (unpack the archive inside {root})")
    images, labels = [], []
    for f in files:
        with open(folder / f, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch[b"labels"])
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)


def stacked_mnist(split: str, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked (Color) MNIST: three MNIST digits of the same split as the R, G, B channels. The triples are
    fixed: indices drawn uniformly with replacement from seed 0 (train) / 1 (test), as many triples as the
    split has digits (60,000 / 10,000). Label = 100·d_R + 10·d_G + d_B, so 1,000 modes."""
    digits, labels = load_mnist_like("mnist", split, root, download)
    gen = torch.Generator().manual_seed(0 if split == "train" else 1)
    idx = torch.randint(len(digits), (len(digits), 3), generator=gen)
    images = torch.cat([digits[idx[:, c]] for c in range(3)], dim=1)
    return images, 100 * labels[idx[:, 0]] + 10 * labels[idx[:, 1]] + labels[idx[:, 2]]


def load_celeba(split: str, root: Path, size: int, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    folder = root / "celeba"
    images_dir, identity = folder / "img_align_celeba", folder / "identity_CelebA.txt"
    if not (images_dir.is_dir() and identity.exists()) and download:
        import torchvision
        try_download(lambda: torchvision.datasets.CelebA(str(root), split="all", target_type="identity",
                                                         download=True), [folder])
    if not (images_dir.is_dir() and identity.exists()):
        raise missing("celeba", [images_dir / "000001.jpg …", identity, folder / "list_eval_partition.txt (optional)"],
                      "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Align&Cropped images, identity file)")
    ids = dict(line.split() for line in identity.read_text().splitlines() if line.strip())
    names = sorted(ids)
    partition = folder / "list_eval_partition.txt"
    if partition.exists():  # 0 = train, 1 = valid, 2 = test; valid joins train
        parts = dict(line.split() for line in partition.read_text().splitlines() if line.strip())
        names = [n for n in names if (parts.get(n, "0") == "2") == (split == "test")]
    elif split == "test":
        raise DatasetError(f"celeba's test split needs {partition} (from the CelebA site's Eval folder)")
    images = read_images([images_dir / n for n in names], size, CELEBA_CROP)
    return images, torch.tensor([int(ids[n]) for n in names], dtype=torch.int64)


def load_lsun(category: str, split: str, root: Path, size: int, download: bool) -> tuple[torch.Tensor, None]:
    """LSUN scene category: an image folder `{root}/lsun/{category}_{split}/` (e.g. exported from the lmdb), or
    the official `{category}_{split}_lmdb` folder read with the `lmdb` package."""
    lsun_split = "train" if split == "train" else "val"
    base = root / "lsun"
    folder, lmdb_dir = base / f"{category}_{lsun_split}", base / f"{category}_{lsun_split}_lmdb"
    if not folder.is_dir() and not lmdb_dir.is_dir() and download:
        from torchvision.datasets.utils import download_and_extract_archive
        url = f"http://dl.yf.io/lsun/scenes/{category}_{lsun_split}_lmdb.zip"
        try_download(lambda: download_and_extract_archive(url, str(base), remove_finished=True), [base])
    if folder.is_dir():
        return read_images(list_images(folder), size, None), None
    if lmdb_dir.is_dir():
        try:
            import lmdb
        except ImportError:
            raise DatasetError(f"{lmdb_dir} is an lmdb database: `pip install lmdb`, or export it to "
                               f"image files in {folder}/") from None
        from io import BytesIO
        env = lmdb.open(str(lmdb_dir), readonly=True, lock=False, readahead=False, meminit=False)
        with env.begin() as txn:
            blobs = [BytesIO(value) for _, value in txn.cursor()]
        return read_images(blobs, size, None), None
    raise missing(f"lsun-{category}", [lmdb_dir, f"or image files in {folder}/"],
                  f"http://dl.yf.io/lsun/scenes/{category}_{lsun_split}_lmdb.zip (unzip it inside {base})")


def load_lfw(split: str, root: Path, size: int, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """LFW (funnelled) in torchvision's layout: `{root}/lfw-py/lfw_funneled/<person>/<image>.jpg`; label = person."""
    if split != "train":
        raise DatasetError("lfw is used whole as training data here: use split='train'")
    folder = root / "lfw-py" / "lfw_funneled"
    if not folder.is_dir() and download:
        import torchvision
        try_download(lambda: torchvision.datasets.LFWPeople(str(root), download=True), [root / "lfw-py"])
    if not folder.is_dir():
        raise missing("lfw", [folder / "<person>/<person>_0001.jpg"],
                      "http://vis-www.cs.umass.edu/lfw/lfw-funneled.tgz", f" (unpack it into {folder.parent})")
    paths = list_images(folder)
    people = sorted({p.parent.name for p in paths})
    index = {name: i for i, name in enumerate(people)}
    return read_images(paths, size, LFW_CROP), torch.tensor([index[p.parent.name] for p in paths])


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_folder(path: Path, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Any folder of images. Images directly in sub-folders get the sub-folder's index as label."""
    if not path.is_dir():
        raise DatasetError(f"folder '{path}' does not exist: pass --dataset folder:<path to a folder of images>")
    paths = list_images(path)
    if not paths:
        raise DatasetError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {path}")
    classes = sorted({p.parent for p in paths})
    labels = None
    if len(classes) > 1 or classes[0] != path:
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[p.parent] for p in paths], dtype=torch.int64)
    return read_images(paths, size, None), labels


def fake_images(split: str, size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Small deterministic synthetic images with 10 classes: class c is a bright square at one of 10 places
    (colour depending on c) on a noisy dark background. 512 train / 256 test images. No files needed."""
    n = 512 if split == "train" else 256
    gen = torch.Generator().manual_seed(0 if split == "train" else 1)
    labels = torch.randint(10, (n,), generator=gen)
    images = torch.randint(0, 48, (n, channels, size, size), generator=gen, dtype=torch.uint8)
    side = max(2, size // 4)
    for c in range(10):
        top, left = (c // 5) * (size // 2) + size // 8, (c % 5) * (size - side) // 4
        colour = torch.tensor([255, 128 + 12 * c, 255 - 20 * c][:channels], dtype=torch.uint8)
        images[labels == c, :, top:top + side, left:left + side] = colour.view(-1, 1, 1)
    return images, labels


# ---------------------------------------------------------------- cache keys

LOADER_VERSION = 2  # bump when a loader's output changes for the same files
ABSENT = "absent"


def loader_parameters(name: str, split: str, size: int) -> dict:
    """Everything besides the raw files that decides a loader's output (part of the cache key)."""
    params = {"name": name, "split": split, "size": size, "version": LOADER_VERSION,
              "resize": "centre square crop, antialiased bilinear, rounded"}
    if name == "celeba":
        params.update(crop=CELEBA_CROP, split_definition="list_eval_partition: 2 = test, 0 and 1 = train; "
                                                         "ids sorted by file name")
    elif name == "lfw":
        params.update(crop=LFW_CROP, labels="person folders, sorted")
    elif name == "stacked-mnist":
        params.update(stacking="3 MNIST digits per image, indices with replacement, seed 0 train / 1 test")
    elif name.startswith("lsun-"):
        params.update(split_definition="train = {category}_train, test = {category}_val")
    return params


def raw_files(name: str, split: str, root: Path) -> list[Path]:
    """The files and folders a loader reads (those that exist)."""
    prefix = "train" if split == "train" else "t10k"
    if name in ("mnist", "fashion-mnist", "stacked-mnist"):
        raw = root / ("FashionMNIST" if name == "fashion-mnist" else "MNIST") / "raw"
        candidates = [raw / f"{prefix}-{kind}{suffix}" for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
                      for suffix in (".gz", "")]
    elif name == "cifar10":
        folder = root / "cifar-10-batches-py"
        candidates = [folder / f"data_batch_{i}" for i in range(1, 6)] if split == "train" else [folder / "test_batch"]
    elif name == "celeba":
        folder = root / "celeba"
        candidates = [folder / "img_align_celeba", folder / "identity_CelebA.txt", folder / "list_eval_partition.txt"]
    elif name.startswith("lsun-"):
        base, lsun_split = root / "lsun", "train" if split == "train" else "val"
        candidates = [base / f"{name[5:]}_{lsun_split}", base / f"{name[5:]}_{lsun_split}_lmdb"]
    elif name == "lfw":
        candidates = [root / "lfw-py" / "lfw_funneled"]
    else:  # folder:<path> is keyed by its own listing
        candidates = []
    return [p for p in candidates if p.exists()]


def raw_signature(name: str, split: str, root: Path) -> str:
    """A cheap fingerprint of the raw files: path, size and modification time of each file; for a folder, the
    sorted relative names of everything in it and the size and time of its small files (≤ 64 files), else the
    folder's own time (big image folders: adding, removing or renaming files changes it; editing one image in
    place does not — delete `{root}/cache/` after doing that)."""
    parts = []
    for path in raw_files(name, split, root):
        st = path.stat()
        if path.is_file():
            parts.append(f"{path.name}|{st.st_size}|{st.st_mtime_ns}")
            continue
        names = sorted(str(Path(d).relative_to(path) / f) for d, _, files in os.walk(path) for f in files)
        parts.append(f"{path.name}/|{len(names)}|{hashlib.sha1(chr(0).join(names).encode()).hexdigest()}")
        if len(names) <= 64:
            parts += [f"{n}|{(path / n).stat().st_size}|{(path / n).stat().st_mtime_ns}" for n in names]
        else:
            parts.append(f"{st.st_mtime_ns}")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:12] if parts else ABSENT


def read_cache(path: Path):
    """(x, y) from a dataset cache file, or None when there is none or it cannot be read (then rebuilt: one line)."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        x, y = saved["x"], saved["y"]
        if not torch.is_tensor(x) or (y is not None and len(y) != len(x)):
            raise ValueError("unexpected content")
        return x, y
    except Exception as e:
        print(f"cache file {path} could not be read ({type(e).__name__}): rebuilding it")
        return None


def load_dataset(name: str, split: str = "train", image_size: int | None = None, root: str | Path = "data",
                 download: bool | None = None, num_samples: int | None = None, channels: int | None = None) -> Data:
    """Load a dataset by name as tensors (see the module docstring). `channels` applies to "fake" only.
    `download=None` tries torchvision's downloader for missing files unless the environment variable
    GAN_DATA_OFFLINE=1 is set (then a missing set fails at once with the message, no network attempted)."""
    if download is None:
        download = os.environ.get("GAN_DATA_OFFLINE", "0") != "1"
    is_folder = name.startswith("folder:")
    if name not in DATASET_NAMES and not is_folder:
        raise DatasetError(f"unknown dataset '{name}'. Valid names: {', '.join(DATASET_NAMES)}, folder:<path>")
    if split not in ("train", "test"):
        raise DatasetError(f"unknown split '{split}': use 'train' or 'test'")
    if num_samples is not None and num_samples <= 0:
        raise DatasetError(f"num_samples must be positive, got {num_samples}")
    root = Path(root)
    if name == "ring":
        ring = ring_data()
        x, y = (ring.train, ring.train_modes) if split == "train" else (ring.test, ring.test_modes)
        return Data(x[:num_samples], y[:num_samples], 8, name, split)
    kind = "folder" if is_folder else name
    size = NATIVE_SIZE[kind] if image_size is None else image_size
    if not isinstance(size, int) or size < 8 or size > 1024:
        raise DatasetError(f"image size {size} is not usable: pick a square size between 8 and 1024 pixels")
    if name == "fake":
        if channels not in (None, 1, 3):
            raise DatasetError(f"fake data has 1 or 3 channels, not {channels}")
        x, y = fake_images(split, size, channels or 1)
        return Data(x[:num_samples], y[:num_samples], 10, name, split)
    if channels is not None:
        raise DatasetError(f"channels is fixed for '{name}'; it can only be chosen for 'fake'")

    key = name
    if is_folder:  # folders change: key the cache by the resolved path and the files' names, sizes and times
        folder = Path(name[len("folder:"):]).expanduser().resolve()
        listing = "".join(f"{p}{p.stat().st_size}{p.stat().st_mtime_ns}" for p in list_images(folder)) \
            if folder.is_dir() else ""
        key = "folder-" + hashlib.sha1((str(folder) + listing).encode()).hexdigest()[:16]
    # the cache file is named by what determines its content: the loader's parameters (crop, split definition,
    # resize, stacking seeds) and a cheap signature (sizes and modification times) of the raw files it reads
    params = hashlib.sha1(repr(loader_parameters(name, split, size)).encode()).hexdigest()[:8]
    stem = f"{key}_{split}_{size}_{params}"
    signature = raw_signature(name, split, root)
    cache = root / "cache" / f"{stem}_{signature}.pt"
    loaded = read_cache(cache)
    if loaded is None and signature == ABSENT:
        # raw files gone (e.g. deleted after the first load): the newest cache of the same loader parameters is
        # the only source of this data, so it cannot be stale with respect to anything on this machine
        candidates = sorted((root / "cache").glob(f"{stem}_*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
        loaded = next((d for d in map(read_cache, candidates) if d is not None), None)
    if loaded is not None:
        x, y = loaded
    else:
        if name in ("mnist", "fashion-mnist"):
            x, y = load_mnist_like(name, split, root, download)
        elif name == "cifar10":
            x, y = load_cifar10(split, root, download)
        elif name == "stacked-mnist":
            x, y = stacked_mnist(split, root, download)
        elif name == "celeba":
            x, y = load_celeba(split, root, size, download)
        elif name.startswith("lsun-"):
            x, y = load_lsun(name[len("lsun-"):], split, root, size, download)
        elif name == "lfw":
            x, y = load_lfw(split, root, size, download)
        else:
            x, y = load_folder(folder, size)
        x = resize_square(x, size)
        if signature == ABSENT:  # the files have just been downloaded
            cache = root / "cache" / f"{stem}_{raw_signature(name, split, root)}.pt"
        cache.parent.mkdir(parents=True, exist_ok=True)
        # write then rename (per-process name): an interrupted or concurrent save leaves no half file behind
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"x": x, "y": y}, tmp)
        os.replace(tmp, cache)
    num_classes = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10, "stacked-mnist": 1000}.get(name)
    if num_classes is None and y is not None:
        num_classes = int(y.max()) + 1
    return Data(x[:num_samples], None if y is None else y[:num_samples], num_classes, name, split)
