"""``train.encoder_cache``: content keys, the on-disk store, and latent runs that train the
same with a cold cache, a warm one, and (to float rounding) none."""

from __future__ import annotations

import warnings

import pytest
import torch
from train_helpers import one_thread, tiny_config  # noqa: F401

from difflab.models import AutoencoderKL, VAEConfig
from difflab.train import Trainer, load_checkpoint, load_config
from difflab.train.cache import EncoderCache, content_key, module_digest, tensor_key


def test_keys_follow_content_shape_dtype_and_flips():
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(1, 8, 8, generator=gen)
    assert tensor_key(img) == tensor_key(img.clone())
    assert tensor_key(img) != tensor_key(img.flip(-1))  # a flipped image is another entry
    assert tensor_key(img) != tensor_key(img.reshape(1, 4, 16))  # same bytes, other shape
    assert tensor_key(img) != tensor_key(img.double())
    assert tensor_key(img) != tensor_key(img, "other encoder")
    assert content_key("ab", "c") != content_key("a", "bc")  # parts are length-prefixed
    net = torch.nn.Conv2d(1, 2, 3)
    before = module_digest(net)
    assert module_digest(net, "max_length=77") != before
    with torch.no_grad():
        net.weight[0, 0, 0, 0] += 1e-6
    assert module_digest(net) != before


def test_store_computes_each_key_once_and_persists(tmp_path):
    calls = []

    def compute(i):
        calls.append(i)
        return {"value": torch.full((2,), float(len(calls)))}

    cache = EncoderCache("enc-1", tmp_path)
    first = cache.get(["k1", "k2", "k1"], compute)
    assert calls == [0, 1] and torch.equal(first[0]["value"], first[2]["value"])
    assert (cache.hits, cache.computed) == (1, 2)

    again = EncoderCache("enc-1", tmp_path)  # a new run: read from disk, nothing computed
    out = again.get(["k2", "k1"], compute)
    assert calls == [0, 1] and again.computed == 0
    assert torch.equal(out[0]["value"], first[1]["value"])
    assert EncoderCache("enc-2", tmp_path).get(["k1"], compute) and calls == [0, 1, 0]


def test_torn_or_foreign_entries_are_named_and_recomputed(tmp_path):
    cache = EncoderCache("enc", tmp_path)
    cache.get(["aa1", "bb2"], lambda i: {"v": torch.tensor([float(i)])})
    torn, other = cache._path("aa1"), cache._path("bb2")
    torn.write_bytes(torn.read_bytes()[:20])
    other.parent.joinpath("bb3.safetensors").write_bytes(other.read_bytes())  # wrong name

    fresh = EncoderCache("enc", tmp_path)
    with pytest.warns(UserWarning, match="unreadable cache entry .*aa1"):
        out = fresh.get(["aa1"], lambda i: {"v": torch.tensor([7.0])})
    assert out[0]["v"].item() == 7.0 and fresh.computed == 1
    with pytest.warns(UserWarning, match="does not hold key bb3"):
        fresh.get(["bb3"], lambda i: {"v": torch.tensor([8.0])})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert EncoderCache("enc", tmp_path).get(["aa1"], lambda i: {})[0]["v"].item() == 7.0


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    cfg = VAEConfig(in_channels=1, out_channels=1, block_out_channels=(8, 16),
                    latent_channels=2, norm_groups=4, scaling_factor=1.0)  # fmt: skip
    AutoencoderKL(cfg, generator=torch.Generator().manual_seed(0)).save_pretrained(folder)
    return folder


def _latent_run(run_dir, vae_dir, *extra):
    opts = [f"latent.vae={vae_dir}", "data.source=digits", "model.image_size=4",
            "model.in_channels=2", "model.attention_resolutions=[2]", "model.num_classes=10",
            "data.random_flip=true", "train.max_steps=6", *extra]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random autoencoder's latent std is not 1
        trainer = Trainer.from_config(tiny_config(run_dir, *opts), progress=False)
        try:
            result = trainer.run()
        finally:
            trainer.close()
    return trainer, result


def test_latent_runs_train_the_same_with_a_cold_or_warm_cache(tmp_path, vae_dir):
    store = tmp_path / "cache"
    cold, a = _latent_run(tmp_path / "cold", vae_dir, f"train.encoder_cache={store}")
    warm, b = _latent_run(tmp_path / "warm", vae_dir, f"train.encoder_cache={store}")
    none, c = _latent_run(tmp_path / "none", vae_dir)
    assert cold.conditioning.latent_cache.computed > 0
    assert warm.conditioning.latent_cache.computed == 0
    cold_cache = cold.conditioning.latent_cache
    assert warm.conditioning.latent_cache.hits == cold_cache.hits + cold_cache.computed
    assert a.losses == b.losses
    wa, wb = load_checkpoint(tmp_path / "cold").model, load_checkpoint(tmp_path / "warm").model
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # Without the cache each batch is encoded at once: the same values to float rounding.
    assert c.losses == pytest.approx(a.losses, rel=1e-5)
    assert none.conditioning.latent_cache is None


def test_a_cache_without_a_frozen_encoder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="caches frozen encoders' outputs, and this run has"):
        load_config(None, ["train.encoder_cache=memory"])
