"""Adapters and embeddings people already have, on Stable Diffusion models loaded by difflab.

A kohya LoRA / LoHa / LoKr file (module names of diffusers' U-Net and transformers' CLIP)
applied by ``Pipeline.load_lora`` to difflab's own U-Net gives the U-Net output that the
same file gives on diffusers' U-Net (``AdapterSet`` there is checked against diffusers'
``load_lora_weights`` and peft in tests/finetune/test_lycoris.py); textual-inversion files
give diffusers' prompt embeddings.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from sd_helpers import tiny_sd1_pipeline, tiny_sdxl_pipeline

import difflab as dl
from difflab.finetune.lycoris import AdapterSet
from difflab.interop.unet import ldm_module_map

ATTN = "down_blocks.1.attentions.0.transformer_blocks.0"
UNET_LAYERS = [f"{ATTN}.attn1.to_q", f"{ATTN}.attn2.to_k", f"{ATTN}.ff.net.0.proj",
               "down_blocks.1.attentions.0.proj_in", "down_blocks.0.resnets.0.conv1",
               "up_blocks.0.resnets.1.conv_shortcut",
               "mid_block.resnets.0.time_emb_proj"]  # fmt: skip
TE_LAYERS = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1"]


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1") / "sd"
    tiny_sd1_pipeline(seed=0).save_pretrained(folder)
    return folder


def _kohya(unet, te, kind: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random adapter tensors of ``kind`` in kohya / LyCORIS key layout."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    pairs = [("lora_unet_", unet.get_submodule(n).weight, n) for n in UNET_LAYERS]
    pairs += [("lora_te_", te.get_submodule(n.removeprefix("text_model.")).weight, n)
              for n in TE_LAYERS]  # fmt: skip
    for prefix, w, name in pairs:
        key = prefix + name.replace(".", "_")
        out_f, in_f, k = w.shape[0], w.shape[1], w.shape[2:]
        rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
        if kind == "lora":
            out[f"{key}.lora_down.weight"] = rnd(2, in_f, *k)
            out[f"{key}.lora_up.weight"] = rnd(out_f, 2, *([1] * len(k)))
        elif kind == "loha":
            flat = in_f * int(torch.tensor(k).prod()) if k else in_f
            for i in (1, 2):
                out[f"{key}.hada_w{i}_a"] = rnd(out_f, 2)
                out[f"{key}.hada_w{i}_b"] = rnd(2, flat)
        else:  # lokr: a whole 2x? left factor and a decomposed right one
            f1 = 2 if out_f % 2 == 0 else 1
            out[f"{key}.lokr_w1"] = rnd(f1, 1)
            flat = in_f * int(torch.tensor(k).prod()) if k else in_f
            out[f"{key}.lokr_w2_a"] = rnd(out_f // f1, 2)
            out[f"{key}.lokr_w2_b"] = rnd(2, flat)
        out[f"{key}.alpha"] = torch.tensor(3.0)
    return out


def _unet_out(net, context, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        if isinstance(net, dl.models.UNet):
            return net(x, t, context=context, **kw)
        return net(x, t, encoder_hidden_states=context).sample


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_kohya_file_on_difflabs_unet_equals_it_on_diffusers_unet(sd1, tmp_path, kind):
    ref = tiny_sd1_pipeline(seed=0)
    state = _kohya(ref.unet, ref.text_encoder, kind)
    path = tmp_path / f"{kind}.safetensors"
    save_file(state, str(path))
    AdapterSet({"unet": ref.unet, "text_encoder": ref.text_encoder}).load(path)

    pipe = dl.Pipeline.from_pretrained(sd1)
    context = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))
    base = _unet_out(pipe.model, context)
    report = pipe.load_lora(path, scale=1.0)
    assert report.kinds == {kind: len(UNET_LAYERS) + len(TE_LAYERS)}
    got, want = _unet_out(pipe.model, context), _unet_out(ref.unet, context)
    assert (got - base).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    ids = ref.tokenizer(["a red house"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        ours_text = pipe.text_encoder.encoder.models[0](ids).last_hidden_state
        ref_text = ref.text_encoder(ids).last_hidden_state
    torch.testing.assert_close(ours_text, ref_text, rtol=0, atol=1e-5)
    assert pipe.resolve_params(1, prompt="x")["lora"][0]["layers"] == len(report.applied)


def test_scales_fuse_and_a_foreign_file(sd1, tmp_path):
    """Scale 0 is the base model; two adapters add up; a file for other shapes is refused
    with its keys named and nothing applied."""
    ref = tiny_sd1_pipeline(seed=0)
    for seed in (1, 2):
        save_file(
            _kohya(ref.unet, ref.text_encoder, "lora", seed), str(tmp_path / f"{seed}.safetensors")
        )
    pipe = dl.Pipeline.from_pretrained(sd1)
    context = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))
    base = _unet_out(pipe.model, context)
    pipe.load_lora(tmp_path / "1.safetensors", scale=0.0)
    torch.testing.assert_close(_unet_out(pipe.model, context), base, rtol=0, atol=0)
    from difflab.interop.unet import diffusers_module_map

    layer = pipe.model.get_submodule(diffusers_module_map(pipe.model.config)[UNET_LAYERS[0]])
    pipe._adapters.set_scale("1", 1.0)
    one = layer.delta_weight()
    pipe.load_lora(tmp_path / "2.safetensors", scale=0.5)
    both = layer.delta_weight()
    pipe._adapters.set_scale("1", 0.0)
    half_two = layer.delta_weight()
    torch.testing.assert_close(both, one + half_two)  # the updates add, each at its scale
    assert not torch.allclose(_unet_out(pipe.model, context), base)
    foreign = {"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.zeros(2, 7, 3, 3),
               "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.zeros(32, 2, 1, 1),
               "lora_unet_no_such_block.lora_down.weight": torch.zeros(2, 4)}  # fmt: skip
    save_file(foreign, str(tmp_path / "foreign.safetensors"))
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    with pytest.raises(ValueError, match="no_such_block") as err:
        pipe.load_lora(tmp_path / "foreign.safetensors")
    assert "conv1" in str(err.value)
    after = pipe.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sdxl_kohya_file_in_ldm_names(tmp_path):
    """kohya's SDXL files name U-Net modules the original (sgm) way: input_blocks_..."""
    ref = tiny_sdxl_pipeline(seed=0)
    folder = tmp_path / "xl"
    ref.save_pretrained(folder)
    pipe = dl.Pipeline.from_pretrained(folder)
    to_ldm = {v: k for k, v in ldm_module_map(pipe.model.config).items()}
    diffusers_name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    from difflab.interop.unet import diffusers_module_map

    ours = diffusers_module_map(pipe.model.config)[diffusers_name]
    key = "lora_unet_" + to_ldm[ours].replace(".", "_")
    w = ref.unet.get_submodule(diffusers_name).weight
    g = torch.Generator().manual_seed(0)
    state = {f"{key}.lora_down.weight": torch.randn(2, w.shape[1], generator=g),
             f"{key}.lora_up.weight": torch.randn(w.shape[0], 2, generator=g),
             f"{key}.alpha": torch.tensor(2.0)}  # fmt: skip
    save_file(state, str(tmp_path / "xl_lora.safetensors"))
    report = pipe.load_lora(tmp_path / "xl_lora.safetensors")
    assert report.applied == [f"unet:{ours}"]
    delta = pipe.model.get_submodule(ours).delta_weight()
    torch.testing.assert_close(
        delta, state[f"{key}.lora_up.weight"] @ state[f"{key}.lora_down.weight"]
    )  # alpha/rank = 1


def test_a1111_embedding_gives_diffusers_prompt_embeddings(sd1, tmp_path):
    ref = dl.Pipeline.from_pretrained(sd1)
    vector = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    save_file({"emb_params": vector}, str(tmp_path / "shiny.safetensors"))
    word = ref.load_embedding(tmp_path / "shiny.safetensors")
    assert word == "shiny" and ref.embeddings == [{"path": str(tmp_path / "shiny.safetensors"),
                                                   "word": "shiny"}]  # fmt: skip
    import diffusers

    theirs = diffusers.StableDiffusionPipeline.from_pretrained(sd1, local_files_only=True)
    theirs.load_textual_inversion(str(tmp_path / "shiny.safetensors"), token="shiny")
    with torch.no_grad():
        want, _ = theirs.encode_prompt(["a shiny house"], "cpu", 1, False)
    got, _ = ref.text_encoder(["a shiny house"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    plain, _ = ref.text_encoder(["a house"])
    assert not torch.allclose(got[:, :3], plain[:, :3])


def test_cli_applies_several_adapter_files_each_at_its_scale(sd1, tmp_path):
    """difflab sample FOLDER --lora A.safetensors:0.5 --lora B.safetensors records each file
    with its own strength and draws what the pipeline draws with both loaded so."""
    import numpy as np
    from PIL import Image

    from difflab.cli import main
    from difflab.cli.common import lora_and_scale
    from difflab.images import make_grid, read_png_params

    ref = tiny_sd1_pipeline(seed=0)
    for seed in (1, 2):
        save_file(_kohya(ref.unet, ref.text_encoder, "lora", seed),
                  str(tmp_path / f"s{seed}.safetensors"))  # fmt: skip
    a, b = tmp_path / "s1.safetensors", tmp_path / "s2.safetensors"
    assert lora_and_scale(f"{a}:0.5", 1.0) == (str(a), 0.5)
    assert lora_and_scale(str(a), 0.7) == (str(a), 0.7)
    out = tmp_path / "lora.png"
    argv = ["sample", str(sd1), "--prompt", "a red house", "--n", "1", "--steps", "2",
            "--lora", f"{a}:0.5", "--lora", str(b), "--lora-scale", "0.25", "-o", str(out)]
    assert main(argv) == 0
    loras = read_png_params(out)["lora"]
    assert [(x["path"], x["scale"]) for x in loras] == [(str(a), 0.5), (str(b), 0.25)]
    pipe = dl.Pipeline.from_pretrained(sd1)
    pipe.load_lora(a, scale=0.5)
    pipe.load_lora(b, scale=0.25)
    want = pipe(1, prompt="a red house", steps=2, progress=False)
    with Image.open(out) as img:
        assert np.array_equal(np.asarray(img), np.asarray(make_grid(want)))


def test_the_web_page_serves_an_sd_model_with_a_negative_prompt(sd1, tmp_path):
    """difflab serve on a diffusers folder: /api/info offers a prompt and a negative prompt,
    and POST /generate answers the pipeline's images with both metadata chunks."""
    import io
    import json
    import urllib.request

    import numpy as np
    from PIL import Image

    from difflab.images import make_grid
    from difflab.web import WebServer, create_app

    pipe = dl.Pipeline.from_pretrained(sd1)
    server = WebServer(create_app(pipe, data_dir=tmp_path / "web"))
    try:
        with urllib.request.urlopen(server.url + "/api/info", timeout=60) as resp:
            info = json.loads(resp.read())
        assert info["text"] and not info["num_classes"]
        body = {"n": 1, "prompt": "a red house", "negative_prompt": "blurry", "steps": 2,
                "seed": 3, "guidance_scale": 5.0, "sampler": "Euler a"}  # fmt: skip
        req = urllib.request.Request(server.url + "/generate", json.dumps(body).encode(),
                                     method="POST")  # fmt: skip
        with urllib.request.urlopen(req, timeout=120) as resp:
            png = Image.open(io.BytesIO(resp.read()))
    finally:
        server.stop()
    assert "Negative prompt: blurry" in png.text["parameters"]
    assert json.loads(png.text["difflab"])["negative_prompt"] == "blurry"
    want = pipe(1, prompt="a red house", negative_prompt="blurry", steps=2, seed=3,
                guidance_scale=5.0, sampler="Euler a", progress=False)  # fmt: skip
    assert np.array_equal(np.asarray(png), np.asarray(make_grid(want)))
