"""Text conditioning pieces: the word tokenizer, the transformer encoder, the U-Net wrapper."""

from __future__ import annotations

import pytest
import torch

from difflab.models import (
    TextConditionedUNet,
    TextConfig,
    TextTransformer,
    UNet,
    UNetConfig,
    WordTokenizer,
)

CAPTIONS = ["a handwritten digit seven", "a handwritten digit one", "A digit, one!"]


@pytest.fixture
def tokenizer():
    return WordTokenizer.from_texts(CAPTIONS, max_length=8)


def test_vocabulary_is_frequency_then_alphabetical(tokenizer):
    # a, digit: 3 each; one: 2; handwritten: 2; then "!", ",", seven once each.
    assert tokenizer.vocab == [
        "<pad>", "<unk>", "<bos>", "a", "digit", "handwritten", "one", "!", ",", "seven",
    ]  # fmt: skip
    assert WordTokenizer.from_texts(CAPTIONS, 8, min_count=2).vocab[3:] == [
        "a", "digit", "handwritten", "one",
    ]  # fmt: skip


def test_encode_bos_unknown_padding_and_empty_prompt(tokenizer):
    ids, mask = tokenizer.encode(["A digit SEVEN", "", "a zebra"])
    assert ids.tolist() == [
        [2, 3, 4, 9, 0, 0, 0, 0],
        [2, 0, 0, 0, 0, 0, 0, 0],  # the empty prompt is <bos> alone, never all-masked
        [2, 3, 1, 0, 0, 0, 0, 0],  # zebra -> <unk>
    ]
    assert mask.tolist() == (ids != 0).tolist()
    assert tokenizer.unknown_words(["a zebra", "digit Yak"]) == ["yak", "zebra"]


def test_long_prompts_are_cut_with_a_warning(tokenizer):
    with pytest.warns(UserWarning, match="only the first 7 are used"):
        ids, mask = tokenizer.encode(["a " * 10])
    assert mask.sum() == 8 and ids[0, 1:].tolist() == [3] * 7


def test_bad_vocabularies_and_inputs_are_refused(tokenizer):
    with pytest.raises(ValueError, match="must start with"):
        WordTokenizer(["a", "b", "c"], 4)
    with pytest.raises(ValueError, match="duplicate"):
        WordTokenizer(["<pad>", "<unk>", "<bos>", "a", "a"], 4)
    with pytest.raises(ValueError, match="max_length"):
        WordTokenizer(["<pad>", "<unk>", "<bos>"], 1)
    with pytest.raises(TypeError, match="list of prompts"):
        tokenizer.encode("a digit")


def test_tokenizer_json_round_trip(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(tokenizer.to_json())
    again = WordTokenizer.load(path)
    assert (again.vocab, again.max_length) == (tokenizer.vocab, tokenizer.max_length)
    assert torch.equal(again.encode(CAPTIONS)[0], tokenizer.encode(CAPTIONS)[0])
    with pytest.raises(FileNotFoundError):
        WordTokenizer.load(tmp_path / "missing.json")


def test_text_config_checks():
    with pytest.raises(ValueError, match="none, transformer, clip"):
        TextConfig(encoder="bert")
    with pytest.raises(ValueError, match="divisible"):
        TextConfig(encoder="transformer", width=30, heads=4)
    assert not TextConfig().enabled and TextConfig(encoder="transformer").enabled


def _encoder(tokenizer, width=16):
    cfg = TextConfig(encoder="transformer", width=width, layers=2, heads=2, max_length=8)
    return TextTransformer(len(tokenizer), cfg, generator=torch.Generator().manual_seed(0))


def test_padding_neither_changes_real_tokens_nor_leaks(tokenizer):
    """Masked positions are invisible: whatever ids sit there, the real tokens' outputs are
    the same, and the padded outputs are zero; a prompt encodes the same alone or batched."""
    enc = _encoder(tokenizer).eval()
    ids, mask = tokenizer.encode(CAPTIONS)
    out = enc(ids, mask)
    noisy = torch.where(mask, ids, torch.randint(0, len(tokenizer), ids.shape))
    assert torch.allclose(enc(noisy, mask), out, atol=1e-6)
    assert torch.all(out[~mask] == 0)
    alone = enc(*tokenizer.encode(CAPTIONS[1:2]))
    assert torch.allclose(alone, out[1:2], atol=1e-6)
    # ... and different words do give different tokens.
    assert not torch.allclose(out[0, :4], out[1, :4], atol=1e-3)


def test_wrapper_encodes_ids_exactly_like_a_given_context(tokenizer):
    unet_cfg = UNetConfig(image_size=8, in_channels=1, model_channels=16, channel_mult=(1, 2),
                          num_res_blocks=1, attention_resolutions=(4,), num_heads=2,
                          norm_groups=4, context_dim=16)  # fmt: skip
    unet = UNet(unet_cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # zero-initialised outputs (conv_out, attention projections) off
        for p in unet.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    model = TextConditionedUNet(unet, _encoder(tokenizer)).eval()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([10.0, 500.0, 900.0])
    ids, mask = tokenizer.encode(CAPTIONS)
    context, context_mask = model.encode(ids, mask)
    by_ids = model(x, t, input_ids=ids, attention_mask=mask)
    assert torch.equal(by_ids, unet(x, t, context=context, context_mask=context_mask))
    assert torch.equal(by_ids, model(x, t, context=context, context_mask=context_mask))
    other = model(x, t, input_ids=tokenizer.encode([""] * 3)[0])  # mask from ids != <pad>
    assert not torch.allclose(other, by_ids, atol=1e-4)  # the text really conditions
    with pytest.raises(ValueError, match="not both"):
        model(x, t, input_ids=ids, context=context)
    assert model.config is unet.config and model.null_class_label is None
