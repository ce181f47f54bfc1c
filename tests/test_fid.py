"""common/fid.py: the Fréchet distance against an independent computation, the content-keyed cache,
the torch-fidelity Inception path with locally written (random) weights, and the digit extractor."""
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn

import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from common.datasets import load_dataset, to_float
from common.fid import (FID, FIDError, _precision_spots, _try, feature_stats, frechet_distance, full_precision,
                        load_digit_classifier, sq_distances)


def reference_fd(a: np.ndarray, b: np.ndarray) -> float:
    """Textbook formula with scipy's matrix square root of Σ1Σ2."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("dim,n", [(8, 500), (64, 2000)])
def test_frechet_distance_matches_scipy_sqrtm(dim, n):
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim))
    b = rng.normal(0.3, 1.2, size=(n, dim)) @ rng.normal(size=(dim, dim))
    ours = frechet_distance(*feature_stats(a), *feature_stats(b))
    assert ours == pytest.approx(reference_fd(a, b), rel=1e-6)


def test_frechet_distance_zero_for_same_and_grows_with_mean_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(1000, 16))
    mu, sigma = feature_stats(a)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9
    shifts = [0.5, 1.0, 2.0]
    values = [frechet_distance(mu, sigma, mu + s, sigma) for s in shifts]
    assert values == pytest.approx([16 * s ** 2 for s in shifts], rel=1e-9)  # same covariance: ‖Δμ‖² exactly


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """Inception weights of the right shapes but random values, written to a file, so the torch-fidelity
    path runs end to end without a download."""
    original = nn.Module.load_state_dict
    nn.Module.load_state_dict = lambda self, *a, **k: None
    tf_inception_load = tf_inception.load_state_dict_from_url
    tf_inception.load_state_dict_from_url = lambda *a, **k: {}
    try:
        torch.manual_seed(0)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        nn.Module.load_state_dict = original
        tf_inception.load_state_dict_from_url = tf_inception_load
    path = tmp_path_factory.mktemp("weights") / "inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_path_end_to_end_offline(tmp_path, random_inception_weights, monkeypatch):
    # torch-fidelity's own network and preprocessing, on 96×96 instead of 299×299 inputs to keep the test fast
    monkeypatch.setattr(tf_inception.FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 96)
    real = load_dataset("fake", channels=1, image_size=32).x[:6]
    fid = FID(real, extractor="inception", inception_weights=random_inception_weights, root=tmp_path, batch_size=4)
    assert fid.extractor_name == "inception-v3-compat" and "6 real" in fid.name
    same = fid(real)
    shifted = fid((real.float() * 0.5 + 100).to(torch.uint8))
    scale = float(fid.mu_real @ fid.mu_real)  # random weights give tiny features: compare against their size
    assert scale > 0 and abs(same) < 1e-6 * scale
    assert shifted > 1e-2 * scale
    grey = fid.features(real[:2])
    assert grey.shape == (2, 2048)
    assert torch.equal(fid.features(real[:2].repeat(1, 3, 1, 1)), grey)  # grey is repeated to 3 channels
    assert torch.equal(fid.features(to_float(real[:2])), grey)  # float in [-1, 1] → the same uint8 images


def test_missing_inception_weights_file_says_what_to_do(tmp_path):
    with pytest.raises(FIDError, match="weights-inception-2015-12-05"):
        FID(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), inception_weights=tmp_path / "nope.pth", root=tmp_path)


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    load_digit_classifier("fake", root=root)  # trains once for the tests below
    return root


def test_digit_classifier_learns_fake_data_and_is_cached(fake_root):
    clf = load_digit_classifier("fake", root=fake_root)
    test = load_dataset("fake", split="test")
    assert clf.test_accuracy > 0.9
    assert (clf.predict(test.x) == test.y).float().mean() > 0.9
    assert clf.features(test.x[:5]).shape == (5, 128)
    assert len(list((fake_root / "classifiers").glob("fake_cnn_*.pt"))) == 1
    probs = clf.probs(to_float(test.x[:7]))  # float input works too
    assert probs.shape == (7, 10) and torch.allclose(probs.sum(1), torch.ones(7))


def test_stacked_classifier_composes_three_digits(mnist_root):
    clf = load_digit_classifier("mnist", root=mnist_root, epochs=3)
    stacked = load_digit_classifier("stacked-mnist", root=mnist_root)
    mnist = load_dataset("mnist", root=mnist_root)
    single = clf.predict(mnist.x[:30])
    images = torch.cat([mnist.x[0:10], mnist.x[10:20], mnist.x[20:30]], dim=1)  # digits i, i+10, i+20 as R,G,B
    expected = 100 * single[0:10] + 10 * single[10:20] + single[20:30]
    assert torch.equal(stacked.predict(images), expected)
    probs = stacked.probs(images)
    assert probs.shape == (10, 1000) and torch.allclose(probs.sum(1), torch.ones(10), atol=1e-5)
    assert torch.equal(probs.argmax(1), expected)
    assert stacked.features(images).shape == (10, 384)


def test_digit_fid_same_data_near_zero_and_cache_keyed_by_content(fake_root):
    data = load_dataset("fake").x
    fid = FID(data[:200], extractor="digits", dataset="fake", root=fake_root)
    assert abs(fid(data[:200])) < 1e-6 * np.trace(fid.sigma_real)
    assert fid(data[200:400]) < fid(torch.full_like(data[200:400], 255)[:, :, :, :])
    other = FID(data[200:400], extractor="digits", dataset="fake", root=fake_root)  # same name, other data
    assert other.cache_path != fid.cache_path
    assert not np.allclose(other.mu_real, fid.mu_real)
    again = FID(data[:200], extractor="digits", dataset="fake", root=fake_root)
    assert again.cache_path == fid.cache_path and np.array_equal(again.sigma_real, fid.sigma_real)


def test_sampling_with_replacement_and_generator_mode_restored(fake_root):
    data = load_dataset("fake").x
    fid = FID(data, extractor="digits", dataset="fake", root=fake_root, num_samples=1000, replace=True)
    assert fid.num_real == 1000  # more draws than the 512 images: only possible with replacement
    with pytest.raises(FIDError, match="without replacement"):
        FID(data, extractor="digits", dataset="fake", root=fake_root, num_samples=1000)

    class Gen(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

        def forward(self, z):
            assert not self.training, "generators are scored in eval mode"
            return torch.tanh(self.bn(z)).reshape(-1, 1, 2, 2).repeat(1, 1, 16, 16)

    gen = Gen().train()
    score = fid.score_generator(gen, torch.randn(64, 4), batch_size=16)
    assert np.isfinite(score) and gen.training
    gen.eval()
    fid.score_generator(gen, torch.randn(64, 4))
    assert not gen.training
    with pytest.raises(FIDError, match="digit extractor covers"):
        FID(data, extractor="digits", dataset="cifar10", root=fake_root)


def test_evaluate_returns_the_contract_dict_with_small_sample_counts(fake_root):
    data = load_dataset("fake").x
    fid = FID(data[:40], extractor="digits", dataset="fake", root=fake_root)
    out = fid.evaluate(data[100:130])
    assert set(out) == {"fid", "kid_mean", "kid_std", "precision", "recall", "extractor", "num_real", "num_fake",
                        "kid_subsets", "kid_subset_size"}  # no IS for the digit extractor
    assert out["extractor"] == "digits-cnn(fake)" and (out["num_real"], out["num_fake"]) == (40, 30)
    assert out["kid_subset_size"] == 30 and out["kid_subsets"] == 100  # min(1000, n): small counts work
    assert out["fid"] == pytest.approx(fid(data[100:130]), rel=1e-12)
    assert 0 <= out["precision"] <= 1 and 0 <= out["recall"] <= 1
    same = fid.evaluate(data[:40])
    assert same["precision"] == same["recall"] == 1.0  # every point lies in its own k-NN ball
    blank = fid.evaluate(torch.full_like(data[:30], 255))
    assert blank["kid_mean"] > 10 * abs(out["kid_mean"]) and blank["fid"] > out["fid"]
    assert blank["precision"] == 0.0


def precision_settings():
    """Every precision switch, read without raising (torch refuses some legacy reads after mixed API use)."""
    b = torch.backends
    return ([o.fp32_precision for _, o in _precision_spots()], _try(torch.get_float32_matmul_precision),
            _try(lambda: b.cuda.matmul.allow_tf32), _try(lambda: b.cudnn.allow_tf32))


def test_full_precision_restores_every_flag_also_after_an_exception():
    b = torch.backends
    saved = precision_settings()
    try:
        torch.set_float32_matmul_precision("medium")  # the house performance switches, reduced precision on
        b.cudnn.allow_tf32 = True
        before = precision_settings()
        assert before[1] == "medium"
        with pytest.raises(KeyError):
            with full_precision():
                assert precision_settings()[1:] == ("highest", False, False)
                raise KeyError("inside")
        assert precision_settings() == before
    finally:
        torch.set_float32_matmul_precision(saved[1])
        b.cudnn.allow_tf32 = saved[3]
        for (_, obj), value in zip(_precision_spots(), saved[0]):
            obj.fp32_precision = value
    assert precision_settings() == saved


def test_sq_distances_exact_far_from_the_origin():
    centre = torch.tensor([[1e3, 1e3]], dtype=torch.float64)
    angle = torch.tensor([0.3, 1.7])
    radius = torch.tensor([0.0299, 0.0301], dtype=torch.float64)
    points = centre + radius[:, None] * torch.stack([angle.cos(), angle.sin()], 1).double()
    d2 = sq_distances(points.float(), centre.float())
    assert d2.dtype == torch.float64 and d2.shape == (2, 1)
