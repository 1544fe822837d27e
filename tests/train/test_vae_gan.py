"""LDM's autoencoder loss with a PatchGAN and a perceptual term (Rombach et al. 2022, app. G):
hinge losses and the adaptive weight against hand-computed values, the discriminator off
before ``disc_start`` (bit for bit the plain autoencoder run), exact resume with the
discriminator, the perceptual distance by hand, and the held-out PSNR / rFID logged."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from difflab.cli import main as cli_main
from difflab.data import DataConfig, build_dataset
from difflab.models import AutoencoderKL, VAEConfig
from difflab.models.discriminator import PatchDiscriminator, patch_logit_side
from difflab.train import load_checkpoint
from difflab.train.autoencoder import train_autoencoder
from difflab.train.gan_loss import GANConfig, adaptive_weight, hinge_d_loss, hinge_g_loss
from difflab.train.perceptual import PerceptualLoss
from difflab.train.validation import split_dataset

VAE = dict(in_channels=1, out_channels=1, block_out_channels=(8, 16), latent_channels=2,
           norm_groups=8)  # fmt: skip
DIGITS = DataConfig(source="digits", image_size=8, channels=1)
GAN = GANConfig(start=2, layers=1, channels=8)
KW = dict(steps=6, batch_size=8, lr=2e-3, progress=False, log_every=1, device="cpu",
          fid=False)  # fmt: skip


def rows(folder, key="loss"):
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]


def random_perceptual_file(path, in_channels=1):
    """A random two-stage feature net in the perceptual file format."""
    g = torch.Generator().manual_seed(7)
    tensors = {
        "stages.0.0.weight": torch.randn(4, in_channels, 3, 3, generator=g),
        "stages.0.0.bias": torch.randn(4, generator=g) * 0.1,
        "stages.1.0.weight": torch.randn(6, 4, 3, 3, generator=g),
        "stages.1.0.bias": torch.randn(6, generator=g) * 0.1,
        "stages.1.1.weight": torch.randn(5, 6, 1, 1, generator=g),
        "stages.1.1.bias": torch.randn(5, generator=g) * 0.1,
        "lin.0.weight": torch.rand(4, generator=g),
    }
    save_file(tensors, str(path), metadata={"pool": "avg"})
    return path


# ------------------------------------------------------------------ losses by hand
def test_hinge_losses_match_hand_computed_values():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 0.5])
    # relu(1 - real) = (0, 0.5, 2) -> 5/6; relu(1 + fake) = (0, 1, 1.5) -> 5/6
    assert float(hinge_d_loss(real, fake)) == pytest.approx(5 / 3)
    assert float(hinge_g_loss(fake)) == pytest.approx(0.5)  # -mean(-2, 0, 0.5)
    # a confident, correct discriminator has zero loss
    assert float(hinge_d_loss(torch.full((2, 1, 3, 3), 1.5), torch.full((2, 1, 3, 3), -1.0))) == 0


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    rec = 3 * w[0] + 4 * w[1]  # gradient (3, 4): norm 5
    g = (w**2).sum()  # gradient 2w = (2, 4): norm sqrt(20)
    lam = adaptive_weight(rec, g, w, disc_weight=0.5)
    assert float(lam) == pytest.approx(0.5 * 5 / (math.sqrt(20) + 1e-4), rel=1e-6)
    assert not lam.requires_grad
    (rec + lam * g).backward()  # both graphs were kept for the update
    torch.testing.assert_close(w.grad, torch.tensor([3.0, 4.0]) + lam * 2 * w.detach())
    # a GAN loss flat at the last layer: 5 / 1e-4 = 5e4, clamped to 1e4
    flat = adaptive_weight(3 * w[0] + 4 * w[1], 0 * w.sum(), w, disc_weight=2.0)
    assert float(flat) == pytest.approx(2.0 * 1e4)


def test_patch_discriminator_shapes_init_and_size_check():
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    d = PatchDiscriminator(3, 8, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is untouched
    again = PatchDiscriminator(3, 8, 3, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(d.state_dict().values(),
                                                 again.state_dict().values()))  # fmt: skip
    # 32 px: three halvings 16, 8, 4, then two k4 s1 p1 convolutions 3, 2
    assert d(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2) and patch_logit_side(32, 3) == 2
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 1]  # pix2pix's widths, capped 8x
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert float(convs[1].weight.detach().std()) == pytest.approx(0.02, rel=0.1)  # DCGAN init
    with pytest.raises(ValueError, match="needs images of at least 24 px, got 8 px"):
        d.check_image_side(8)
    with pytest.raises(ValueError, match="at least 24 px"):
        train_autoencoder("unused", DIGITS, VAEConfig(**VAE), gan=GANConfig(layers=3), **KW)


def test_perceptual_distance_matches_hand_computed_values(tmp_path):
    # one stage, a 1x1 conv to (x, -x): after ReLU and unit normalisation a pixel's feature
    # is (1, 0) if x > 0, (0, 1) if x < 0 and (0, 0) at 0; channel weights (2, 3)
    net = PerceptualLoss([[(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1), torch.zeros(2))]],
                         [torch.tensor([2.0, 3.0])])  # fmt: skip
    x = torch.tensor([0.5, -0.5, 0.5, 0.0]).view(1, 1, 2, 2)
    y = torch.tensor([-0.5, -0.2, 0.0, 0.7]).view(1, 1, 2, 2)
    # per pixel: signs differ -> 2 + 3; same -> 0; (1,0) vs 0 -> 2; 0 vs (1,0) -> 2
    assert float(net(x, y)[0]) == pytest.approx((5 + 0 + 2 + 2) / 4)
    # the file format: a random net, read back, symmetric and zero on identical images
    path = random_perceptual_file(tmp_path / "p.safetensors")
    net = PerceptualLoss.from_file(path)
    a, b = torch.rand(3, 1, 8, 8) * 2 - 1, torch.rand(3, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(net(a, b), net(b, a))
    assert torch.equal(net(a, a), torch.zeros(3)) and bool((net(a, b) > 0).all())
    taps = net.features(a)
    assert [t.shape[1:] for t in taps] == [(4, 8, 8), (5, 4, 4)]  # avg-pooled second stage
    assert torch.equal(net.lin1, torch.ones(5))  # missing lin weights are ones
    assert not any(p.requires_grad for p in net.parameters())
    with pytest.raises(FileNotFoundError, match="do not exist"):
        PerceptualLoss.from_file(tmp_path / "missing.safetensors")
    save_file({"features.0.weight": torch.zeros(1)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ValueError, match=r"expected stages\.I\.J\.weight"):
        PerceptualLoss.from_file(tmp_path / "odd.safetensors")


# ------------------------------------------------------------------ training
def test_discriminator_is_off_before_disc_start(tmp_path):
    """Steps 1..start of a GAN run are bit for bit the plain run's; the discriminator keeps
    its initial weights and has no optimiser state until then."""
    kw = {**KW, "save_every": 0}
    plain = tmp_path / "plain"
    gan = tmp_path / "gan"
    assert train_autoencoder(plain, DIGITS, VAEConfig(**VAE), stop_at=2, **kw) is None
    assert train_autoencoder(gan, DIGITS, VAEConfig(**VAE), gan=GAN, stop_at=2, **kw) is None
    assert [r["loss"] for r in rows(gan)] == [r["loss"] for r in rows(plain)]
    assert all("d_loss" not in r for r in rows(gan))
    a, b = load_checkpoint(plain / "checkpoint"), load_checkpoint(gan / "checkpoint")
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    fresh = PatchDiscriminator(1, 8, 1, generator=torch.Generator().manual_seed(0 + 2))
    disc = {k[len("discriminator.") :]: v for k, v in b.model.items()
            if k.startswith("discriminator.")}  # fmt: skip
    assert disc.keys() == fresh.state_dict().keys()
    assert all(torch.equal(disc[k], v) for k, v in fresh.state_dict().items())
    n_ae = len(list(AutoencoderKL(VAEConfig(**VAE)).parameters()))
    assert b.optimizer["state"].keys() == a.optimizer["state"].keys() == set(range(n_ae))
    assert len(b.optimizer["param_groups"]) == 2  # the discriminator's Adam, still unstepped

    # step 3 runs the discriminator: its loss is logged and its weights move
    train_autoencoder(gan, DIGITS, VAEConfig(**VAE), gan=GAN, stop_at=3, resume=True, **kw)
    last = rows(gan)[-1]
    assert last["step"] == 3 and {"d_loss", "g_loss", "d_weight"} <= last.keys()
    c = load_checkpoint(gan / "checkpoint")
    assert not torch.equal(c.model["discriminator.main.0.weight"], disc["main.0.weight"])
    assert len(c.optimizer["state"]) > n_ae


def test_resume_with_discriminator_and_perceptual_term_is_bit_exact(tmp_path):
    """6 steps in one go == 3 + resume + 3: autoencoder and discriminator weights, both
    optimisers' states, every logged number (random flips and posterior sampling on)."""
    data = DataConfig(source="digits", image_size=8, channels=1, random_flip=True)
    path = random_perceptual_file(tmp_path / "p.safetensors")
    kw = {**KW, "gan": GANConfig(start=1, layers=1, channels=8), "perceptual_weights": path,
          "perceptual_weight": 0.5, "save_every": 2, "eval_every": 2}  # fmt: skip
    full = train_autoencoder(tmp_path / "full", data, VAEConfig(**VAE), **kw)
    assert train_autoencoder(tmp_path / "cut", data, VAEConfig(**VAE), stop_at=3, **kw) is None
    with pytest.raises(ValueError, match=r"other settings \(gan differ\)"):
        train_autoencoder(
            tmp_path / "cut",
            data,
            VAEConfig(**VAE),
            resume=True,
            **{**kw, "gan": GANConfig(start=1, layers=1, channels=8, weight=1)},
        )
    rest = train_autoencoder(tmp_path / "cut", data, VAEConfig(**VAE), resume=True, **kw)
    assert rest.final_loss == full.final_loss and rest.held_out_psnr == full.held_out_psnr
    a, b = (
        load_checkpoint(tmp_path / "full" / "checkpoint"),
        load_checkpoint(tmp_path / "cut" / "checkpoint"),
    )
    assert a.model.keys() == b.model.keys() and any(k.startswith("discriminator.") for k in a.model)
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    assert a.optimizer["state"].keys() == b.optimizer["state"].keys()
    for k, state in a.optimizer["state"].items():
        assert all(torch.equal(v, b.optimizer["state"][k][n]) for n, v in state.items())
    full_rows, cut_rows = rows(tmp_path / "full", "step"), rows(tmp_path / "cut", "step")
    assert full_rows == cut_rows and len(full_rows) == 6 + 3  # 6 steps, evals at 2, 4, 6
    steps = [r for r in full_rows if "loss" in r]
    assert all("perceptual" in r and ("d_loss" in r) == (r["step"] > 1) for r in steps)
    w = load_file(tmp_path / "full" / "diffusion_pytorch_model.safetensors")
    v = load_file(tmp_path / "cut" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(w[k], v[k]) for k in w)


def test_a_checkpoint_from_before_the_gan_settings_resumes_without_held_out_images(tmp_path):
    kw = {**KW, "steps": 3, "val_fraction": 0.0}
    assert train_autoencoder(tmp_path, DIGITS, VAEConfig(**VAE), stop_at=2, **kw) is None
    state = tmp_path / "checkpoint" / "train_state" / "state.json"
    meta = json.loads(state.read_text())
    for key in ("gan", "perceptual", "val_fraction"):  # what an older difflab wrote
        del meta["settings"][key]
    state.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"other settings \(val_fraction differ\)"):
        train_autoencoder(tmp_path, DIGITS, VAEConfig(**VAE), resume=True, **KW)
    run = train_autoencoder(tmp_path, DIGITS, VAEConfig(**VAE), resume=True, **kw)
    assert run.steps == 3 and run.held_out_psnr is None and not rows(tmp_path, "psnr_held_out")


def test_held_out_psnr_and_digits_rfid_are_logged(tmp_path):
    from difflab.eval.features import DigitsClassifier
    from difflab.eval.metrics import FeatureStats, frechet_distance, to_uint8

    run = train_autoencoder(tmp_path, DIGITS, VAEConfig(**VAE), **{**KW, "steps": 3,
                            "fid": None, "val_fraction": 0.02, "eval_every": 2})  # fmt: skip
    evals = rows(tmp_path, "psnr_held_out")
    assert [r["step"] for r in evals] == [2, 3] and evals[-1]["psnr_held_out"] == run.held_out_psnr
    # by hand: the saved autoencoder on the held-out split (36 of the 1797 digits)
    dataset, _ = build_dataset(DIGITS)
    _, held = split_dataset(dataset, 0.02, 0)
    assert len(held) == evals[-1]["n_held_out"] == 36
    x = torch.stack([held[i]["image"] for i in range(len(held))]).float()
    vae = AutoencoderKL.from_pretrained(tmp_path)
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).mean)
    mse = float(((rec - x) ** 2).mean())
    assert run.held_out_psnr == pytest.approx(10 * math.log10(4 / mse), rel=1e-5)
    clf = DigitsClassifier()
    a = FeatureStats.from_features(clf(to_uint8(x)), clf.id)
    b = FeatureStats.from_features(clf(to_uint8(rec)), clf.id)
    assert run.rfid == pytest.approx(frechet_distance(a.mean, a.cov, b.mean, b.cov), rel=1e-4)
    assert run.rfid > 0 and "rfid_digits" in evals[0]


def test_cli_train_vae_with_discriminator_and_perceptual_term(tmp_path, capsys):
    path = random_perceptual_file(tmp_path / "p.safetensors")
    out = tmp_path / "vae"
    args = ["train-vae", "--out", str(out), "--steps", "2", "--batch-size", "8", "--widths",
            "8,16", "--latent-channels", "2", "--disc-start", "1", "--disc-layers", "1",
            "--disc-channels", "8", "--perceptual-weights", str(path), "--eval-every", "2",
            "--val-fraction", "0.01"]  # fmt: skip
    assert cli_main(args) == 0
    assert "held-out images: PSNR" in capsys.readouterr().out
    last = rows(out)[-1]
    assert last["step"] == 2 and {"d_loss", "perceptual"} <= last.keys()
    state = json.loads((out / "checkpoint" / "train_state" / "state.json").read_text())
    assert state["settings"]["gan"]["layers"] == 1
    assert state["settings"]["perceptual"] == {"weights": str(path), "weight": 1.0}
    base = ["train-vae", "--steps", "2", "--widths", "8,16"]
    assert cli_main([*base, "--out", str(tmp_path / "b"), "--disc-weight", "1"]) == 2
    assert "--disc-weight configure the discriminator: add --disc-start N" in (
        capsys.readouterr().err
    )
    assert cli_main([*base, "--out", str(tmp_path / "c"), "--disc-start", "0"]) == 2
    assert "needs images of at least 24 px" in capsys.readouterr().err
    assert cli_main([*base, "--out", str(tmp_path / "d"), "--perceptual-weights", "nope"]) == 2
    assert "do not exist" in capsys.readouterr().err
