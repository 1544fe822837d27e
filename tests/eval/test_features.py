"""difflab.eval.features: FID Inception-v3 layout and loading, digits classifier and its cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from difflab.eval.features import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_URL,
    DigitsClassifier,
    InceptionV3Features,
    build_inception,
    digits_data,
    digits_split,
    resize_clean,
    resize_legacy,
)
from difflab.eval.metrics import conditional_accuracy, evaluate


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small CPU ops run 10x faster on one thread when the 2-core test machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ Inception


@pytest.fixture(scope="module")
def inception_net():
    return build_inception(torch.Generator().manual_seed(0))


def test_inception_state_dict_layout_matches_pytorch_fid(inception_net):
    sd = inception_net.state_dict()
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert sd["Mixed_5b.branch_pool.conv.weight"].shape == (32, 192, 1, 1)
    assert sd["Mixed_6e.branch7x7dbl_5.conv.weight"].shape == (192, 192, 1, 7)
    assert sd["Mixed_7c.branch3x3dbl_3b.bn.running_var"].shape == (384,)
    assert sd["fc.weight"].shape == (1008, 2048)
    assert not any(k.startswith("AuxLogits") for k in sd)
    n_params = sum(
        v.numel() for k, v in sd.items() if "running" not in k and "num_batches" not in k
    )
    # torchvision's inception_v3 has 27,161,264 parameters; minus its aux head (3,326,696)
    # plus 8 more fc classes (8 * 2048 + 8) gives the FID network's count.
    assert n_params == 27_161_264 - 3_326_696 + 8 * 2048 + 8


def test_inception_weights_roundtrip_pth_and_safetensors(inception_net, tmp_path, monkeypatch):
    sd = inception_net.state_dict()
    pth = tmp_path / "pt_inception.pth"
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, pth)
    st = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    for path in (pth, st):
        loaded = InceptionV3Features(path, resize="legacy").network.state_dict()
        assert loaded.keys() == sd.keys()
        assert all(torch.equal(loaded[k], v) for k, v in sd.items() if "num_batches" not in k)
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(st))
    assert InceptionV3Features(resize="legacy").network.fc.bias.equal(inception_net.fc.bias)


def test_inception_load_is_strict_and_loud(inception_net, tmp_path):
    sd = {k: v.contiguous() for k, v in inception_net.state_dict().items()}
    sd.pop("Mixed_6a.branch3x3.conv.weight")
    sd["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    sd["fc.bias"] = torch.zeros(1000)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(ValueError) as err:
        InceptionV3Features(bad)
    msg = str(err.value)
    assert "1 missing ['Mixed_6a.branch3x3.conv.weight']" in msg
    assert "1 unexpected ['AuxLogits.fc.weight']" in msg
    assert "fc.bias: file (1000,) vs model (1008,)" in msg


def test_inception_missing_weights_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as err:
        InceptionV3Features()
    assert INCEPTION_WEIGHTS_URL in str(err.value) and INCEPTION_WEIGHTS_ENV in str(err.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in INCEPTION_WEIGHTS_URL
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        InceptionV3Features(tmp_path / "nothere.pth")


def test_inception_features_logits_shapes_and_resize_ids(inception_net):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g)
    clean = InceptionV3Features(network=inception_net, resize="clean")
    legacy = InceptionV3Features(network=inception_net, resize="legacy")
    assert (clean.id, legacy.id) == ("inception-v3-fid/clean", "inception-v3-fid/legacy")
    assert clean.settings() == {"extractor": "inception-v3-fid/clean", "resize": "clean"}
    feats, logits = clean.features_and_logits(images)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32 and feats.isfinite().all()
    assert logits.shape == (2, 1008)
    # logits are the fc layer applied to the pool3 features
    torch.testing.assert_close(logits, inception_net.fc(feats).detach(), atol=1e-4, rtol=1e-4)
    # grey images are the same as their RGB replication
    grey = images[:1, :1]
    assert torch.equal(legacy(grey), legacy(grey.expand(-1, 3, -1, -1).contiguous()))
    with pytest.raises(TypeError, match="to_uint8"):
        clean(images.float())
    with pytest.raises(ValueError, match="unknown resize mode 'bilinear'"):
        InceptionV3Features(network=inception_net, resize="bilinear")


def test_resize_modes_known_answers():
    const = torch.full((1, 2, 8, 8), 77, dtype=torch.uint8)
    assert torch.allclose(resize_clean(const, 299), torch.full((1, 2, 299, 299), 77.0), atol=1e-3)
    assert torch.allclose(resize_legacy(const, 299), torch.full((1, 2, 299, 299), 77.0))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (1, 1, 20, 20), dtype=torch.uint8, generator=g)
    assert torch.allclose(resize_clean(x, 20), x.float(), atol=1e-3)  # same size: identity
    assert torch.equal(resize_legacy(x, 20), x.float())
    # clean (bicubic) and legacy (bilinear) differ on real content; clean stays in [0, 255]
    up = resize_clean(x, 61)
    assert up.min() >= 0 and up.max() <= 255
    assert (up - resize_legacy(x, 61)).abs().max() > 1.0


# ------------------------------------------------------------------------------ digits


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("digits_cache")


@pytest.fixture(scope="module")
def digits(digits_cache):
    global_state = torch.get_rng_state()
    clf = DigitsClassifier(cache=digits_cache)
    assert torch.equal(torch.get_rng_state(), global_state)  # no global RNG used
    return clf


def test_digits_classifier_held_out_accuracy_and_cache(digits, digits_cache):
    assert digits.accuracy >= 0.95
    images, labels = digits_data()
    _, held = digits_split(len(images))
    acc = conditional_accuracy(digits, images[held], labels[held])
    assert acc == pytest.approx(digits.accuracy)
    with safe_open(str(digits.path), framework="pt") as f:
        meta = f.metadata()
    assert float(meta["held_out_accuracy"]) == digits.accuracy
    assert meta["n_held_out"] == str(len(held)) == "359"
    assert digits.path.parent == digits_cache and len(list(digits_cache.iterdir())) == 1
    again = DigitsClassifier(cache=digits_cache)  # loads, does not retrain
    assert again.accuracy == digits.accuracy
    assert torch.equal(again(images[:5]), digits(images[:5]))


def test_digits_classifier_accepts_upsampled_images(digits):
    images, labels = digits_data()
    _, held = digits_split(len(images))
    small = images[held][:50]
    big = small.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # (50, 1, 32, 32)
    assert torch.equal(digits.predict(big), digits.predict(small))
    assert digits(big).shape == (50, 64) and digits.logits(big).shape == (50, 10)
    assert digits.settings()["extractor"] == "digits-cnn"


@pytest.mark.filterwarnings("ignore:.*not comparable")
def test_digits_fid_small_between_halves_large_for_noise(digits):
    images, _ = digits_data()
    first, second = images[:900], images[900:]
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(900, 1, 8, 8, generator=g) * 2 - 1
    real_vs_real = evaluate(second, first, extractor=digits, metrics=("fid", "kid"), kid_subsets=10)
    real_vs_noise = evaluate(noise, first, extractor=digits, metrics=("fid", "kid"), kid_subsets=10)
    assert real_vs_real["extractor"] == "digits-cnn"
    assert real_vs_noise["fid[digits-cnn]"] > 10 * real_vs_real["fid[digits-cnn]"]
    assert real_vs_noise["kid[digits-cnn]"] > 10 * abs(real_vs_real["kid[digits-cnn]"])
    assert np.isfinite(real_vs_real["fid[digits-cnn]"])


def test_digits_accuracy_and_inception_score_through_evaluate(digits):
    images, labels = digits_data()
    _, held = digits_split(len(images))
    res = evaluate(
        images[held],
        extractor=digits,
        metrics=("accuracy", "inception_score"),
        classifier=digits,
        labels=labels[held],
        is_splits=1,
    )
    assert res["accuracy[digits-cnn]"] == pytest.approx(digits.accuracy)
    # 10 balanced, confidently recognised classes: IS close to its maximum of 10
    assert 8.0 < res["is[digits-cnn]"] <= 10.0
    assert res["n"] == 359 and "fid[digits-cnn]" not in res
