"""A frozen T5 encoder (Imagen-style conditioning), with a tiny random T5 and a word-level
tokenizer saved to a local folder: the encoder's outputs, a run that trains, resumes and
samples from prompts, and clear errors for a folder of the wrong kind."""

from __future__ import annotations

import pytest
import torch
from train_helpers import one_thread, tiny_config, train_with_a_cut  # noqa: F401

transformers = pytest.importorskip("transformers")

import difflab as dl  # noqa: E402
from difflab.models import TextConfig  # noqa: E402
from difflab.models.text import PretrainedTextEncoder  # noqa: E402
from difflab.samplers import sample  # noqa: E402
from difflab.train import load_checkpoint, load_config, train  # noqa: E402

WORDS = "a handwritten digit zero one two three four five six seven eight nine"
PROMPTS = ["a handwritten digit seven", "a handwritten digit one", ""]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    folder = tmp_path_factory.mktemp("t5")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in WORDS.split():
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )  # T5 ends every sequence with </s>
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    config = transformers.T5Config(
        vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.T5EncoderModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def t5_opts(folder):
    return ["model.num_classes=null", "data.source=digits", "text.encoder=t5",
            f"text.path={folder}", "text.max_length=8", "train.max_steps=4"]  # fmt: skip


def test_encoder_equals_the_t5_models_own_output(t5_dir):
    enc = PretrainedTextEncoder(t5_dir, max_length=8, kind="t5")
    context, mask = enc(PROMPTS)
    tok = transformers.AutoTokenizer.from_pretrained(t5_dir)
    ref = transformers.T5EncoderModel.from_pretrained(t5_dir).eval()
    batch = tok(PROMPTS, padding="max_length", max_length=8, return_tensors="pt")
    with torch.no_grad():
        expected = ref(**batch).last_hidden_state
    assert context.shape == (3, 8, 16) and enc.width == 16
    torch.testing.assert_close(context, expected, rtol=0, atol=0)
    assert mask.tolist()[0] == [True] * 5 + [False] * 3  # 4 words + </s>, then padding
    assert TextConfig(encoder="t5", path=str(t5_dir)).context_dim == 16


def test_a_folder_of_another_kind_is_named(t5_dir, tmp_path):
    with pytest.raises(ValueError, match=r"text.encoder: clip, but .* holds a 't5' model"):
        TextConfig(encoder="clip", path=str(t5_dir))
    with pytest.raises(ValueError, match="text.encoder: t5 needs text.path, a local T5 folder"):
        TextConfig(encoder="t5")


def test_t5_run_resumes_bit_for_bit_and_samples_from_prompts(t5_dir, tmp_path):
    opts = [*t5_opts(t5_dir), "diffusion.cond_drop_prob=0.5"]
    full = train(tiny_config(tmp_path / "full", *opts))
    rest = train_with_a_cut(tiny_config(tmp_path / "split", *opts), 2)
    assert rest.losses == full.losses[2:]
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "split")
    assert all(torch.equal(a.ema[k], b.ema[k]) for k in a.ema)
    assert not any(k.startswith(("text.", "encoder.")) for k in a.model)  # frozen T5 stays out
    assert load_config(tmp_path / "full" / "config.yaml", []).model_config().context_dim == 16

    pipe = dl.Pipeline.from_run(tmp_path / "full")
    assert isinstance(pipe.text_encoder, PretrainedTextEncoder) and pipe.text_encoder.kind == "t5"
    prompts = PROMPTS[:2]
    images = pipe(n=2, prompt=prompts, sampler="ddim", steps=3, guidance_scale=2.0, seed=1,
                  clip_x0=False)  # fmt: skip
    enc = PretrainedTextEncoder(t5_dir, max_length=8, kind="t5")
    (ctx, mask), (empty, empty_mask) = enc(prompts), enc(["", ""])
    with torch.no_grad():
        expected = sample(
            pipe.model, (2, 1, 8, 8), schedule=pipe.schedule, sampler="ddim", steps=3,
            guidance_scale=2.0, cond={"context": ctx, "context_mask": mask},
            uncond={"context": empty, "context_mask": empty_mask},
            generator=[torch.Generator().manual_seed(1 + i) for i in range(2)],
            prediction=pipe.prediction, variance=pipe.variance, progress=False,
        )  # fmt: skip
    torch.testing.assert_close(images, expected.clamp(-1, 1), rtol=0, atol=1e-6)
    # The few-step net's samples saturate at ±1, so the images alone would not show the
    # prompt: the network's prediction does differ between the two prompts' tokens.
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([500.0])
    with torch.no_grad():
        eps = [pipe.model(x, t, context=ctx[i : i + 1], context_mask=mask[i : i + 1])
               for i in range(2)]  # fmt: skip
    assert not torch.allclose(eps[0], eps[1])


def test_an_added_word_with_a_known_words_vector_encodes_as_that_word(t5_dir):
    """Textual inversion's injection: a new word whose vector is "seven"'s embedding gives
    exactly the tokens of "seven" (the hook replaces the token embedding, nothing else)."""
    enc = PretrainedTextEncoder(t5_dir, max_length=8, kind="t5")
    seven = enc.word_embedding("seven")
    enc.add_word("sks", seven)
    with_sks, mask_sks = enc(["a handwritten digit sks"])
    with_seven, mask_seven = enc(["a handwritten digit seven"])
    assert torch.equal(with_sks, with_seven) and torch.equal(mask_sks, mask_seven)
    grad_vec = seven.clone().requires_grad_(True)
    ctx, _ = enc.encode(["a handwritten digit sks"], {next(iter(enc.words)): grad_vec})
    ctx.sum().backward()
    assert grad_vec.grad is not None and grad_vec.grad.abs().sum() > 0  # it can be trained
