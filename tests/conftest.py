"""Shared test fixtures: tiny real-format datasets written to a temporary folder, and a runner that
starts a script as a subprocess. Nothing here touches the network or ../shared."""
import gzip
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an array in the IDX format MNIST uses (uint8 data, big-endian int32 sizes), gzipped."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def digit_like_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n 28×28 uint8 images whose content depends on their label (a bright bar at a label-given row),
    so a classifier can learn them."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        row = 3 + 2 * int(label)
        images[i, row:row + 2, 4:24] = 255
    return images, labels


def make_mnist(root: Path, folder: str = "MNIST", n_train: int = 256, n_test: int = 128) -> Path:
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = digit_like_images(n, seed)
        write_idx(raw / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def make_cifar10(root: Path, n_train: int = 200, n_test: int = 100) -> Path:
    """The python-pickle layout of CIFAR-10 (data_batch_1..5, test_batch, batches.meta)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per_batch = n_train // 5
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    data = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": rng.integers(0, 10, size=n_test).tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, f)
    return root


@pytest.fixture
def mnist_root(tmp_path) -> Path:
    """A data root holding tiny MNIST-format IDX files at <root>/MNIST/raw/ (256 train / 128 test)."""
    return make_mnist(tmp_path / "data")


@pytest.fixture
def cifar_root(tmp_path) -> Path:
    """A data root holding tiny CIFAR-10 pickles at <root>/cifar-10-batches-py/ (200 train / 100 test)."""
    return make_cifar10(tmp_path / "data")


@pytest.fixture
def run_script():
    """run_script("alpha_dual_gan.py", "--num-seeds", "2", cwd=tmp_path) runs the script as a subprocess
    on CPU with one thread and returns the CompletedProcess; a non-zero exit fails the test with the output
    unless check=False."""

    def run(script: str, *args: str, cwd: Path, timeout: float = 600, check: bool = True, env: dict | None = None):
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                    "PYTHONHASHSEED": "0", **(env or {})}
        proc = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=full_env,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            pytest.fail(f"{script} {' '.join(map(str, args))} exited {proc.returncode}\n"
                        f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
        return proc

    return run


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared CPU run far faster on one torch thread; the previous setting is restored afterwards.
    A test module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class StopAfter:
    """Stands in for a script's Ctrl-C event: is_set() turns true after n checks (the loop checks once per whole
    step, and once before each configuration)."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def is_set(self):
        self.calls += 1
        return self.calls > self.n

    def set(self):
        self.n = -10


def skip_unless_medium_reduces_matmuls() -> None:
    """Skip a medium-vs-highest comparison where it would compare a run with itself. `medium` computes float32
    matmuls in bf16 only where oneDNN has bf16 instructions (AVX512-BF16 or AMX CPUs); on other CPUs (AMD Zen 3,
    for one) it is full float32, bit for bit. CPU convolutions stay full float32 under it everywhere (oneDNN's
    convolution precision, torch.backends.mkldnn.conv.fp32_precision, stays "none")."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 256, generator=gen), torch.randn(256, 64, generator=gen)
    saved = torch.get_float32_matmul_precision()
    try:
        exact = x @ w
        torch.set_float32_matmul_precision("medium")
        reduced = not torch.equal(x @ w, exact)
    finally:
        torch.set_float32_matmul_precision(saved)
    if not reduced:
        pytest.skip("this CPU runs float32 matmuls in full precision under 'medium' (no bf16 instructions)")


def skip_if_medium_changed_nothing(highest, medium) -> None:
    """After the runs: skip where 'medium' left every number as it was (a model without a float32 matmul large
    enough for oneDNN's bf16 path, e.g. one made only of convolutions), rather than pass an empty comparison."""
    flat = lambda x: [x] if isinstance(x, torch.Tensor) else [t for item in x for t in flat(item)]
    if all(torch.equal(a, b) for a, b in zip(flat(highest), flat(medium), strict=True)):
        pytest.skip("'medium' changed no number of this model on this CPU: nothing to compare")
