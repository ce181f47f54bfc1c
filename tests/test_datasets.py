"""common/datasets.py on tiny real-format files written by the tests (no network, no ../shared)."""
import math
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import common.datasets as datasets
from common.datasets import (Batches, DatasetError, load_dataset, ring_data, to_float, to_uint8, try_download)
from conftest import digit_like_images, make_cifar10, make_mnist, write_idx


def test_mnist_idx_shapes_labels_and_cache(mnist_root):
    data = load_dataset("mnist", root=mnist_root, download=False)
    images, labels = digit_like_images(256, seed=0)  # what the fixture wrote
    assert data.x.shape == (256, 1, 28, 28) and data.x.dtype == torch.uint8
    assert torch.equal(data.x[:, 0], torch.from_numpy(images))
    assert torch.equal(data.y, torch.from_numpy(labels.astype(np.int64))) and data.num_classes == 10
    test = load_dataset("mnist", split="test", image_size=32, root=mnist_root, download=False)
    assert test.x.shape == (128, 1, 32, 32) and test.x.dtype == torch.uint8
    (cache,) = (mnist_root / "cache").glob("mnist_train_28_*.pt")
    for raw in (mnist_root / "MNIST" / "raw").iterdir():  # the second load must come from the cache alone
        raw.unlink()
    again = load_dataset("mnist", root=mnist_root, download=False)
    assert torch.equal(again.x, data.x) and torch.equal(again.y, data.y)
    assert len(load_dataset("mnist", root=mnist_root, num_samples=10)) == 10


def test_fashion_mnist_uses_its_own_folder(tmp_path):
    root = make_mnist(tmp_path / "data", folder="FashionMNIST", n_train=64, n_test=32)
    data = load_dataset("fashion-mnist", root=root, download=False)
    assert data.x.shape == (64, 1, 28, 28)
    with pytest.raises(DatasetError, match="MNIST"):
        load_dataset("mnist", root=root, download=False)


def test_cifar10_pickles_channel_layout(cifar_root):
    data = load_dataset("cifar10", root=cifar_root, download=False)
    assert data.x.shape == (200, 3, 32, 32) and data.x.dtype == torch.uint8 and data.y.shape == (200,)
    with open(cifar_root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    row = np.asarray(batch[b"data"][0])  # 1024 red, then 1024 green, then 1024 blue values, row-major
    assert data.x[0, 1, 2, 3].item() == row[1024 + 2 * 32 + 3]
    assert data.y[0].item() == batch[b"labels"][0]
    small = load_dataset("cifar10", split="test", image_size=16, root=cifar_root, download=False)
    assert small.x.shape == (100, 3, 16, 16)


def test_image_folder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    data = load_dataset(f"folder:{tmp_path / 'imgs'}", image_size=16, root=tmp_path / "data")
    assert data.x.shape == (6, 3, 16, 16) and data.x.dtype == torch.uint8
    assert data.y.tolist() == [0, 0, 0, 1, 1, 1]
    # a flat colour image stays that colour through the crop and resize
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.full((30, 60, 3), (10, 200, 90), np.uint8)).save(flat / "a.png")
    one = load_dataset(f"folder:{flat}", image_size=8, root=tmp_path / "data")
    assert one.y is None and one.x[0, :, 4, 4].tolist() == [10, 200, 90]


def test_missing_data_message_names_files_and_source(tmp_path):
    root = tmp_path / "data"
    with pytest.raises(DatasetError) as err:
        load_dataset("mnist", root=root, download=False)
    message = str(err.value)
    assert str(root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz") in message
    assert "Get it from" in message and message.startswith("error:")
    assert not root.exists() or not any(root.rglob("*")), "a failed load left files behind"
    with pytest.raises(DatasetError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", root=root, download=False)
    with pytest.raises(DatasetError, match="identity_CelebA.txt"):
        load_dataset("celeba", root=root, download=False)


def test_unknown_name_and_bad_sizes_fail_with_the_fix():
    with pytest.raises(DatasetError, match="Valid names: mnist, fashion-mnist, cifar10"):
        load_dataset("imagenet")
    with pytest.raises(DatasetError, match="image size"):
        load_dataset("fake", image_size=3)
    with pytest.raises(DatasetError, match="split"):
        load_dataset("fake", split="valid")


def test_failed_download_leaves_no_partial_files(tmp_path):
    folder = tmp_path / "MNIST"
    (folder / "raw").mkdir(parents=True)
    (folder / "raw" / "keep.txt").write_text("was here before")

    def half_download():
        (folder / "raw" / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b partial")
        raise ConnectionError("no network")

    assert try_download(half_download, [folder]) is False
    assert sorted(p.name for p in (folder / "raw").iterdir()) == ["keep.txt"]

    fresh_root = tmp_path / "fresh"

    def creates_root_then_fails():
        (fresh_root / "cifar-10-batches-py").mkdir(parents=True)
        (fresh_root / "cifar-10-python.tar.gz").write_bytes(b"partial")
        raise OSError("no network")

    assert try_download(creates_root_then_fails, [fresh_root / "cifar-10-batches-py",
                                                  fresh_root / "cifar-10-python.tar.gz"]) is False
    assert not fresh_root.exists()


def test_ring_modes_means_and_fixed_sets():
    ring = ring_data()
    assert ring.train.shape == (50_000, 2) and ring.test.shape == (25_000, 2)
    assert ring.train_noise.shape == (50_000, 2) and ring.test_noise.shape == (25_000, 2)
    for i in range(8):
        angle = 2 * math.pi * (i + 1) / 8
        points = ring.train[ring.train_modes == i]
        assert torch.allclose(points.mean(0), torch.tensor([math.cos(angle), math.sin(angle)]), atol=2e-3)
        assert abs(points.std(0).mean().item() - 0.01) < 1e-3
    assert ring.train_modes.bincount().min() > 5_000  # all 8 modes present, roughly balanced
    again = ring_data()
    assert torch.equal(again.train, ring.train) and torch.equal(again.test_noise, ring.test_noise)
    data = load_dataset("ring", split="test")
    assert torch.equal(data.x, ring.test) and data.num_classes == 8


def test_stacked_mnist_labels_match_channel_digits(mnist_root):
    mnist = load_dataset("mnist", root=mnist_root, download=False)
    stacked = load_dataset("stacked-mnist", root=mnist_root, download=False)
    assert stacked.x.shape == (256, 3, 28, 28) and stacked.num_classes == 1000
    assert 0 <= stacked.y.min() and stacked.y.max() <= 999
    flat = mnist.x[:, 0].reshape(len(mnist), -1)
    for k in range(20):
        digits = []
        for c in range(3):
            match = (flat == stacked.x[k, c].reshape(1, -1)).all(1).nonzero()
            assert len(match) >= 1, "each channel must be one MNIST digit"
            digits.append(mnist.y[match[0, 0]].item())
        assert stacked.y[k].item() == 100 * digits[0] + 10 * digits[1] + digits[2]
    assert torch.equal(load_dataset("stacked-mnist", root=mnist_root).x, stacked.x)  # fixed set


def test_fake_data_is_deterministic_and_labelled():
    a, b = load_dataset("fake"), load_dataset("fake")
    assert a.x.shape == (512, 1, 32, 32) and torch.equal(a.x, b.x) and a.y.max() <= 9
    rgb = load_dataset("fake", split="test", channels=3, image_size=16)
    assert rgb.x.shape == (256, 3, 16, 16)
    # the class is visible in the image: images of one class are closer to their class mean than to another's
    x = a.x.float().flatten(1)
    means = torch.stack([x[a.y == c].mean(0) for c in range(10)])
    assert (torch.cdist(x, means).argmin(1) == a.y).float().mean() > 0.95


def test_float_conversion_round_trip():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    f = to_float(x)
    assert f.min() == -1 and f.max() == 1
    assert torch.equal(to_uint8(f), x)


def test_batches_cover_each_epoch_and_resume_exactly():
    data = torch.arange(10)
    batches = Batches(data, batch_size=5, generator=torch.Generator().manual_seed(0))
    assert batches.steps_per_epoch == 2
    seen = torch.cat([b for (b,) in batches.iter_epoch()])
    assert sorted(seen.tolist()) == list(range(10)) and batches.epoch == 0
    first = batches.next()[0]
    assert batches.epoch == 1  # crossed into the next epoch
    state = batches.state_dict()
    rest = [batches.next()[0] for _ in range(5)]
    resumed = Batches(data, batch_size=5, generator=torch.Generator().manual_seed(123))
    resumed.load_state_dict(state)
    assert all(torch.equal(r, batches_r) for r, batches_r in zip([resumed.next()[0] for _ in range(5)], rest))
    assert not torch.equal(first, seen[:5]) or not torch.equal(rest[0], seen[5:])  # a new permutation per epoch
    with pytest.raises(DatasetError, match="batch"):
        Batches(torch.arange(3), batch_size=4)


def test_a_script_stops_on_missing_data_with_the_message_only(tmp_path, run_script):
    proc = run_script("adaptive_wgan.py", "--lam", "3", "--dataset", "cifar10", "--data-root", tmp_path / "empty",
                      cwd=tmp_path, check=False, env={"GAN_DATA_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 1
    assert "cifar-10-batches-py/data_batch_1" in proc.stderr and "Get it from" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "empty").exists()


# ---------------------------------------------------------------- cache keys and unreadable cache files

def test_changed_raw_files_give_a_new_cache_entry_and_new_data(mnist_root):
    first = load_dataset("mnist", root=mnist_root, download=False)
    raw = mnist_root / "MNIST" / "raw"
    images, labels = digit_like_images(256, seed=5)  # other images, same count: same sizes in the array
    write_idx(raw / "train-images-idx3-ubyte.gz", images)
    write_idx(raw / "train-labels-idx1-ubyte.gz", labels)
    stat = (raw / "train-images-idx3-ubyte.gz").stat()
    os.utime(raw / "train-images-idx3-ubyte.gz", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = load_dataset("mnist", root=mnist_root, download=False)
    assert torch.equal(second.x[:, 0], torch.from_numpy(images)) and not torch.equal(second.x, first.x)
    assert len(list((mnist_root / "cache").glob("mnist_train_28_*.pt"))) == 2


def test_truncated_cache_file_is_rebuilt_with_one_line(mnist_root, capsys):
    data = load_dataset("mnist", root=mnist_root, download=False)
    (cache,) = (mnist_root / "cache").glob("mnist_train_28_*.pt")
    cache.write_bytes(cache.read_bytes()[:200])
    capsys.readouterr()
    again = load_dataset("mnist", root=mnist_root, download=False)
    out = capsys.readouterr().out
    assert torch.equal(again.x, data.x) and torch.equal(again.y, data.y)
    assert out.count("\n") == 1 and "could not be read" in out and "rebuilding" in out and str(cache) in out
    assert torch.equal(torch.load(cache, weights_only=True)["x"], data.x)  # the rebuilt file is whole again


def make_celeba(root, n: int = 6):
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"{i:06d}.jpg" for i in range(1, n + 1)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(folder / "img_align_celeba" / name)
    (folder / "identity_CelebA.txt").write_text("".join(f"{name} {i % 3}\n" for i, name in enumerate(names)))
    (folder / "list_eval_partition.txt").write_text("".join(f"{name} {2 if i >= 4 else 0}\n"
                                                            for i, name in enumerate(names)))
    return folder


def test_crop_and_split_definition_are_part_of_the_cache_key(tmp_path, monkeypatch):
    folder = make_celeba(tmp_path)
    base = load_dataset("celeba", image_size=16, root=tmp_path, download=False)
    assert len(base) == 4
    monkeypatch.setattr(datasets, "CELEBA_CROP", 60)  # another crop: another entry, other pixels
    cropped = load_dataset("celeba", image_size=16, root=tmp_path, download=False)
    assert not torch.equal(cropped.x, base.x)
    monkeypatch.undo()
    assert torch.equal(load_dataset("celeba", image_size=16, root=tmp_path, download=False).x, base.x)
    partition = folder / "list_eval_partition.txt"  # another split definition: one more training image
    partition.write_text(partition.read_text().replace(" 2\n", " 0\n", 1) + "\n")
    assert len(load_dataset("celeba", image_size=16, root=tmp_path, download=False)) == 5
    assert len(list((tmp_path / "cache").glob("celeba_train_16_*.pt"))) == 3
