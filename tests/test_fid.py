"""common/fid.py: the Fréchet distance against an independent computation, the content-keyed cache,
the torch-fidelity Inception path with locally written (random) weights, and the digit extractor."""
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn

import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from common.datasets import load_dataset, to_float
from common.fid import (FID, FIDError, _precision_spots, _try, feature_stats, frechet_distance,
                        frechet_distance_from_features, full_precision,
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


SMALL_INPUT = 96  # the torch-fidelity network on 96×96 instead of 299×299 inputs keeps these tests fast


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """Inception weights of the right shapes but random values, written to a file, so the torch-fidelity
    path runs end to end without a download. Batch-norm statistics are set from one batch of images (as in
    data-dependent initialisation), so that features and logits are O(1) rather than vanishing."""
    original = nn.Module.load_state_dict
    nn.Module.load_state_dict = lambda self, *a, **k: None
    tf_inception_load = tf_inception.load_state_dict_from_url
    tf_inception.load_state_dict_from_url = lambda *a, **k: {}
    size = tf_inception.FeatureExtractorInceptionV3.INPUT_IMAGE_SIZE
    try:
        torch.manual_seed(0)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
        tf_inception.FeatureExtractorInceptionV3.INPUT_IMAGE_SIZE = SMALL_INPUT
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average: one batch sets the statistics
        net.train()
        with torch.no_grad():
            net(load_dataset("fake", channels=3, image_size=32).x[:16])
    finally:
        nn.Module.load_state_dict = original
        tf_inception.load_state_dict_from_url = tf_inception_load
        tf_inception.FeatureExtractorInceptionV3.INPUT_IMAGE_SIZE = size
    path = tmp_path_factory.mktemp("weights") / "inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def small_inception(monkeypatch):
    monkeypatch.setattr(tf_inception.FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", SMALL_INPUT)


def test_inception_path_end_to_end_offline(tmp_path, random_inception_weights, small_inception):
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


def test_weights_without_a_classifier_give_no_inception_score(tmp_path, random_inception_weights, small_inception,
                                                              capsys):
    weights = torch.load(random_inception_weights, weights_only=True)
    weights["fc.weight"].zero_()  # as in FID-only weight files: IS would read exactly 1.0
    weights["fc.bias"].zero_()
    path = tmp_path / "fid-only.pth"
    torch.save(weights, path)
    real, fake = real_and_fake(6, 6)
    fid = FID(real, inception_weights=path, root=tmp_path, batch_size=6, progress=False)
    assert capsys.readouterr().out.count("no Inception Score") == 1
    out = fid.evaluate(fake)
    assert "is_mean" not in out and np.isfinite(out["fid"]) and np.isfinite(out["kid_mean"])


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


# ---------------------------------------------------------------- agreement with torch-fidelity's calculate_metrics

class ImageSet(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def real_and_fake(n_real=24, n_fake=20):
    data = load_dataset("fake", channels=3, image_size=32)
    real = data.x[:n_real]
    fake = data.x[100:100 + n_fake].clone()
    fake[:, 1] = fake[:, 1] // 2 + 60  # another colour balance and brightness: a clearly different distribution
    return real, fake


def test_metrics_equal_torch_fidelity_calculate_metrics(tmp_path, random_inception_weights, small_inception):
    import torch_fidelity
    real, fake = real_and_fake()
    fid = FID(real, extractor="inception", inception_weights=random_inception_weights, root=tmp_path, batch_size=8)
    ours = fid.evaluate(fake)
    theirs = torch_fidelity.calculate_metrics(
        input1=ImageSet(fake), input2=ImageSet(real[fid.real_index]), cuda=False, isc=True, fid=True, kid=True, prc=True,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(random_inception_weights),
        kid_subset_size=len(fake), batch_size=8, save_cpu_ram=True, cache=False, verbose=False)
    assert ours["kid_subset_size"] == len(fake) and ours["num_fake"] == 20 and ours["num_real"] == 24
    for key, their_key in [("fid", "frechet_inception_distance"), ("kid_mean", "kernel_inception_distance_mean"),
                           ("kid_std", "kernel_inception_distance_std"), ("is_mean", "inception_score_mean"),
                           ("is_std", "inception_score_std"), ("precision", "precision"), ("recall", "recall")]:
        assert ours[key] == pytest.approx(theirs[their_key], rel=1e-4, abs=1e-12), key
    # the numbers mean something: the sets differ clearly, and the same set scores ~0
    assert ours["fid"] > 1e-3 * np.trace(fid.sigma_real) and ours["kid_mean"] > 10 * ours["kid_std"] / np.sqrt(100)
    assert abs(fid(real)) < 1e-6 * np.trace(fid.sigma_real)


@pytest.mark.parametrize("n", [20, 300])  # fewer samples than features (the n×n path) and more (the d×d path)
def test_frechet_distance_from_features_matches_the_statistics_formula(n):
    rng = np.random.default_rng(n)
    real = rng.normal(size=(500, 64)) @ rng.normal(size=(64, 64))
    fake = rng.normal(0.2, 1.1, size=(n, 64)) @ rng.normal(size=(64, 64))
    mu, sigma = feature_stats(real)
    ours = frechet_distance_from_features(fake, mu, sigma)
    # (with n < d the d×d path adds √(rounding noise) of the covariance's null space: ~1e-8 relative here)
    assert ours == pytest.approx(frechet_distance(*feature_stats(fake), mu, sigma), rel=1e-9 if n > 64 else 1e-7)
    assert ours == pytest.approx(reference_fd(fake, real), rel=1e-6)  # scipy's sqrtm is the least accurate of the three


# ---------------------------------------------------------------- caches keyed by everything that decides them

def test_real_cache_keyed_by_weights_images_and_count_and_rebuilt_when_truncated(
        tmp_path, random_inception_weights, small_inception, monkeypatch, capsys):
    import common.fid as fid_module
    monkeypatch.setattr(fid_module, "LONG_JOB_SECONDS", 0)  # announce even this tiny job
    real, other = real_and_fake(8, 8)
    fid = FID(real, extractor="inception", inception_weights=random_inception_weights, root=tmp_path, batch_size=4)
    printed = capsys.readouterr()
    (note,) = [line for line in printed.out.splitlines() if "images/s" in line]  # one line: rate, time, the fix
    assert "8 real images take about" in note and "--fid-samples" in note and "--fid-extractor digits" in note
    assert "Inception features (real)" in printed.err and "8/8" in printed.err  # the progress bar

    weights = torch.load(random_inception_weights, weights_only=True)
    weights["Mixed_7c.branch_pool.conv.weight"][0, 0, 0, 0] += 0.5  # one number of one tensor
    perturbed = tmp_path / "perturbed.pth"
    torch.save(weights, perturbed)
    runs = {"weights": FID(real, inception_weights=perturbed, root=tmp_path, batch_size=4),
            "images": FID(other, inception_weights=random_inception_weights, root=tmp_path, batch_size=4),
            "count": FID(real, num_samples=7, inception_weights=random_inception_weights, root=tmp_path, batch_size=4)}
    for what, changed in runs.items():
        assert changed.cache_path != fid.cache_path, what
        assert not np.allclose(changed.mu_real, fid.mu_real, rtol=1e-6, atol=0), what
    assert len(list((tmp_path / "fid_stats").glob("*.npz"))) == 4

    with monkeypatch.context() as m:
        m.setattr(FID, "_extract", lambda *a, **k: pytest.fail("the same inputs must come from the cache"))
        again = FID(real, inception_weights=random_inception_weights, root=tmp_path, batch_size=4)
    assert again.cache_path == fid.cache_path and np.array_equal(again.sigma_real, fid.sigma_real)
    assert torch.equal(again.real_features, fid.real_features)  # what KID and precision/recall need

    fid.cache_path.write_bytes(fid.cache_path.read_bytes()[:1000])  # a truncated .npz
    capsys.readouterr()
    rebuilt = FID(real, inception_weights=random_inception_weights, root=tmp_path, batch_size=4)
    out = capsys.readouterr().out
    assert out.count("could not be read") == 1 and "Traceback" not in out and str(fid.cache_path) in out
    assert np.array_equal(rebuilt.mu_real, fid.mu_real) and np.array_equal(rebuilt.sigma_real, fid.sigma_real)
    assert np.array_equal(np.load(fid.cache_path)["mu"], fid.mu_real)  # the rebuilt file is whole again


def test_digit_classifier_and_its_statistics_follow_the_training_data(mnist_root, capsys):
    from conftest import digit_like_images, write_idx
    real = load_dataset("mnist", split="test", root=mnist_root).x
    first = FID(real, extractor="digits", dataset="mnist", root=mnist_root, progress=False)
    (old,) = (mnist_root / "classifiers").glob("mnist_cnn_*.pt")
    images, labels = digit_like_images(256, seed=7)  # other training data (same count and file sizes)
    raw = mnist_root / "MNIST" / "raw"
    write_idx(raw / "train-images-idx3-ubyte.gz", 255 - images)
    write_idx(raw / "train-labels-idx1-ubyte.gz", labels)
    second = FID(real, extractor="digits", dataset="mnist", root=mnist_root, progress=False)
    assert len(list((mnist_root / "classifiers").glob("mnist_cnn_*.pt"))) == 2  # retrained, not reused
    assert second.cache_path != first.cache_path  # the new weights are in the statistics' key
    assert abs(second(real)) < 1e-6 * np.trace(second.sigma_real)  # the same set reads ~0, never stale
    assert abs(first(real)) < 1e-6 * np.trace(first.sigma_real)

    (new,) = set((mnist_root / "classifiers").glob("mnist_cnn_*.pt")) - {old}
    new.write_bytes(new.read_bytes()[:300])  # truncated: trained again, with one line
    capsys.readouterr()
    clf = load_digit_classifier("mnist", root=mnist_root, progress=False)
    out = capsys.readouterr().out
    assert out.count("could not be read") == 1 and "rebuilding" in out and str(new) in out
    assert torch.equal(clf.net.head.weight.cpu(), second.classifier.net.head.weight.cpu())  # same recipe, same net


# ---------------------------------------------------------------- full precision whatever the caller's settings

def test_metrics_bit_identical_when_the_caller_reduced_precision(tmp_path, fake_root, random_inception_weights,
                                                                 small_inception):
    import shutil
    data = load_dataset("fake").x
    real, fake = real_and_fake(12, 10)
    noise = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    seen = set()

    class Gen(nn.Module):  # notes the matmul precision it runs under: generation is part of the evaluation
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 1024), nn.Tanh(), nn.Unflatten(1, (1, 32, 32)))

        def forward(self, z):
            seen.add(torch.get_float32_matmul_precision())
            return self.net(z)

    gen = Gen()

    def run(i):
        shutil.rmtree(fake_root / "fid_stats", ignore_errors=True)  # real features computed again, too
        digits = FID(data[:60], extractor="digits", dataset="fake", root=fake_root, progress=False)
        inception = FID(real, inception_weights=random_inception_weights, root=tmp_path / str(i),
                        batch_size=6, progress=False)
        return (digits.mu_real.tobytes(), digits.evaluate_generator(gen, noise, batch_size=16),
                inception.mu_real.tobytes(), inception.evaluate(fake))

    b, saved = torch.backends, (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    runs = [run(0)]
    x, w = torch.randn(64, 512), torch.randn(512, 64)
    exact = x @ w
    try:
        torch.set_float32_matmul_precision("medium")  # on this CPU: float32 matmuls through bfloat16
        b.cudnn.allow_tf32 = True
        reduced_matters = not torch.equal(x @ w, exact)
        clf = load_digit_classifier("fake", root=fake_root, progress=False)
        probe = clf._prepare(data[:64])  # 28×28 floats, as the classifier sees them
        with torch.no_grad():
            reduced_features = clf.net.body(probe)
        runs.append(run(1))
    finally:
        torch.set_float32_matmul_precision(saved[0])
        b.cudnn.allow_tf32 = saved[1]
    with torch.no_grad():
        full_features = clf.net.body(probe)
    if reduced_matters:  # the caller's setting changes the classifier outside full_precision()…
        assert not torch.equal(reduced_features, full_features)
    assert runs[1] == runs[0]  # …and nothing inside it: every number equal to the last bit
    assert seen == {"highest"}
    assert "is_mean" in runs[0][3] and "is_mean" not in runs[0][1]


def test_sq_distances_classify_points_near_a_far_ring_mode():
    from fractions import Fraction
    centre = torch.tensor([[1000.0, 1000.0]])
    # points 0.0299 and 0.0301 from the mode along x and along the diagonal, as float32 (what a generator emits)
    offsets = [(0.0299, 0.0), (0.0301, 0.0), (0.0299 / 2 ** 0.5, 0.0299 / 2 ** 0.5), (0.0301 / 2 ** 0.5, 0.0301 / 2 ** 0.5)]
    points = centre + torch.tensor(offsets)
    exact = [sum((Fraction(float(p)) - Fraction(float(c))) ** 2 for p, c in zip(pt, centre[0]))  # exact rationals
             for pt in points.double()]
    inside = [d <= Fraction(0.03) ** 2 for d in exact]
    assert inside == [True, False, True, False]
    d2 = sq_distances(points, centre)
    assert d2.dtype == torch.float64 and d2.shape == (4, 1)
    assert [bool(v <= 0.03 ** 2) for v in d2[:, 0]] == inside
    assert d2[:, 0].tolist() == pytest.approx([float(d) for d in exact], rel=1e-12)
    # torch.cdist's matmul form ‖a‖² + ‖b‖² − 2a·b (its default from 25 points on) cancels at ‖a‖² ≈ 2·10⁶
    crowd = points.repeat(8, 1)
    mm = torch.cdist(crowd, centre, compute_mode="use_mm_for_euclid_dist") ** 2
    assert [bool(v <= 0.03 ** 2) for v in mm[:4, 0]] != inside
    assert torch.equal(sq_distances(crowd, centre), d2.repeat(8, 1))
    # batched (…×N×D against …×M×D), as the ring metrics call it
    modes = torch.stack([centre[0], centre[0] + 5])
    batched = sq_distances(points[None].expand(3, -1, -1), modes[None].expand(3, -1, -1))
    assert batched.shape == (3, 4, 2) and torch.equal(batched[1, :, :1], d2)
