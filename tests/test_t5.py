"""T5 v1.1 / UMT5 encoders: parity with transformers, tokenizers, sharded loading, XXL memory, errors.

Nothing is downloaded: the reference models are small random transformers models and the tokenizer a
tiny sentencepiece model trained here, saved in HF's formats and loaded with our code.
"""

import io
import json
import logging
import math
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import sentencepiece
from jax.sharding import PartitionSpec as P

from sora_jax.models import t5, text
from sora_jax.parallel import mesh as mesh_lib

MAX_LENGTH = 24
PROMPTS = [
    "a cat",
    "a red square slides to the left",
    "A blue circle moves up, then bounces!",
]
LONG_PROMPT = " ".join(["a red square slides to the left and a blue circle moves up"] * 4)
CORPUS = PROMPTS + [
    "two green triangles and a yellow star drift slowly across a dark purple background",
    "the camera pans over a quiet city street at night, lights reflecting in puddles",
    "a dog runs along the beach while waves roll in and seagulls circle overhead",
    "an orange hexagon spins in place, growing larger and then shrinking again",
    "white clouds move quickly over green hills under a bright blue summer sky",
    "a wooden boat floats down a winding river past tall trees and old stone bridges",
    "close-up of raindrops falling on a window, blurred shapes moving behind the glass",
]
# Small models with the real layouts: 16 relative-position buckets up to distance 20, so sequences of
# MAX_LENGTH + 8 tokens reach the logarithmic buckets and the last, clamped one.
SMALL = dict(vocab_size=320, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=3,
             num_decoder_layers=1, feed_forward_proj="gated-gelu", relative_attention_num_buckets=16,
             relative_attention_max_distance=20)
XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")
T5_XXL = t5.T5Config(model_type="t5", vocab_size=32128, **XXL)
UMT5_XXL = t5.T5Config(model_type="umt5", vocab_size=256384, **XXL)


@pytest.fixture(scope="module")
def transformers():
    pytest.importorskip("torch")
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory):
    """A sentencepiece unigram model with T5's special ids (pad 0, eos 1, unk 2)."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4), model_writer=model, vocab_size=200, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    folder = tmp_path_factory.mktemp("spiece")
    (folder / "spiece.model").write_bytes(model.getvalue())
    return folder


@pytest.fixture(scope="module")
def hf_tokenizer(transformers, spiece_dir):
    return transformers.T5Tokenizer.from_pretrained(str(spiece_dir))


def _reference_model(transformers, kind, dtype="float32"):
    """A random transformers encoder whose norms and position biases are far from their init (ones,
    small), so that swapping them or misplacing a bucket shows."""
    import torch

    torch.manual_seed({"t5": 0, "umt5": 1, "full": 2}[kind])
    model = {
        "t5": lambda: transformers.T5EncoderModel(transformers.T5Config(**SMALL)),
        "umt5": lambda: transformers.UMT5EncoderModel(transformers.UMT5Config(**SMALL)),
        "full": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(**SMALL)),
    }[kind]().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.uniform_(0.5, 1.5)
            if "relative_attention_bias" in name:
                param.normal_()
    return model.to(getattr(torch, dtype))


@pytest.fixture(scope="module")
def t5_checkpoint(transformers, hf_tokenizer, tmp_path_factory):
    """T5EncoderModel in one model.safetensors, with tokenizer.json (and no spiece.model)."""
    folder = tmp_path_factory.mktemp("t5")
    model = _reference_model(transformers, "t5")
    model.save_pretrained(str(folder), safe_serialization=True)
    hf_tokenizer.save_pretrained(str(folder))
    assert (folder / "tokenizer.json").is_file() and not (folder / "spiece.model").exists()
    return folder, model


@pytest.fixture(scope="module")
def umt5_checkpoint(transformers, spiece_dir, tmp_path_factory):
    """UMT5EncoderModel sharded over several files with an index, with spiece.model only."""
    folder = tmp_path_factory.mktemp("umt5")
    model = _reference_model(transformers, "umt5")
    model.save_pretrained(str(folder), safe_serialization=True, max_shard_size="40KB")
    shutil.copy(spiece_dir / "spiece.model", folder)
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 3
    return folder, model


@pytest.fixture(scope="module")
def encoders(t5_checkpoint, umt5_checkpoint):
    return {
        "t5": text.get_text_encoder("t5", max_length=MAX_LENGTH, path=t5_checkpoint[0]),
        "umt5": text.get_text_encoder("umt5", max_length=MAX_LENGTH, path=umt5_checkpoint[0]),
    }


def _padded_ids(vocab_size, lengths, total):
    ids = np.random.RandomState(0).randint(3, vocab_size, (len(lengths), total))
    mask = np.arange(total)[None] < np.array(lengths)[:, None]
    return np.where(mask, ids, 0).astype(np.int32), mask


def _reference_states(model, ids, mask):
    import torch

    with torch.no_grad():
        encoder = getattr(model, "encoder", model)
        out = encoder(input_ids=torch.tensor(ids, dtype=torch.long),
                      attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state
    return out.float().numpy()


def _states(folder, ids, mask, dtype="float32"):
    config = t5.T5Config.from_json(folder / "config.json")
    params = t5.load_t5_params(folder, config, dtype=dtype)
    model = t5.T5Encoder(config, t5.DTYPES[dtype])
    return np.asarray(jax.jit(model.apply)({"params": params}, ids, mask))


def test_relative_position_buckets_match_transformers(transformers):
    import torch

    bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    for length, num_buckets, max_distance in [(300, 32, 128), (40, 16, 20), (24, 8, 10)]:
        offsets = torch.arange(length)[None, :] - torch.arange(length)[:, None]
        expected = bucket(offsets, bidirectional=True, num_buckets=num_buckets, max_distance=max_distance)
        np.testing.assert_array_equal(
            t5.relative_position_buckets(length, num_buckets, max_distance), expected.numpy())


@pytest.mark.parametrize("kind", ["t5", "umt5", "full"])
def test_last_hidden_states_match_transformers_at_valid_positions(kind, transformers, t5_checkpoint,
                                                                   umt5_checkpoint, tmp_path):
    """T5 (shared bias table), UMT5 (a table per layer, sharded checkpoint) and a full
    encoder-decoder checkpoint, whose decoder is ignored; sequences reach the clamped buckets."""
    if kind == "full":
        model = _reference_model(transformers, "full")
        model.save_pretrained(str(tmp_path), safe_serialization=True)
        folder = tmp_path
    else:
        folder, model = {"t5": t5_checkpoint, "umt5": umt5_checkpoint}[kind]
    ids, mask = _padded_ids(SMALL["vocab_size"], [MAX_LENGTH + 8, 10, 3], MAX_LENGTH + 8)
    np.testing.assert_allclose(_states(folder, ids, mask)[mask],
                               _reference_states(model, ids, mask)[mask], atol=1e-5, rtol=0)


def test_bf16_checkpoints_load_exactly_and_run_in_bf16(transformers, tmp_path):
    model = _reference_model(transformers, "umt5", dtype="bfloat16")
    model.save_pretrained(str(tmp_path), safe_serialization=True, max_shard_size="40KB")
    ids, mask = _padded_ids(SMALL["vocab_size"], [MAX_LENGTH, 5], MAX_LENGTH)
    # The bf16 weights, computed in f32 on both sides: exact reading of bf16 tensors.
    expected = _reference_states(model.float(), ids, mask)
    np.testing.assert_allclose(_states(tmp_path, ids, mask)[mask], expected[mask], atol=1e-5, rtol=0)

    config = t5.T5Config.from_json(tmp_path / "config.json")
    params = t5.load_t5_params(tmp_path, config, dtype="bfloat16")
    assert params["layers"]["query"].dtype == jnp.bfloat16
    assert params["token_embedding"].dtype == jnp.bfloat16
    out = _states(tmp_path, ids, mask, dtype="bfloat16")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[mask], expected[mask], atol=0.1, rtol=0.02)


@pytest.mark.parametrize("kind", ["t5", "umt5"])
def test_tokenizer_matches_transformers_with_padding_and_truncation(kind, encoders, hf_tokenizer):
    """t5 reads tokenizer.json, umt5 spiece.model; both append EOS and keep it when truncating."""
    prompts = PROMPTS + [LONG_PROMPT]
    expected = hf_tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH)
    input_ids, mask = encoders[kind].tokenize(prompts)
    np.testing.assert_array_equal(input_ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, np.array(expected["attention_mask"], bool))
    assert input_ids[-1, -1] == hf_tokenizer.eos_token_id and mask[:-1].sum(axis=1).max() < MAX_LENGTH


@pytest.mark.parametrize("kind", ["t5", "umt5"])
def test_encode_matches_transformers_end_to_end(kind, encoders, hf_tokenizer, t5_checkpoint,
                                                umt5_checkpoint):
    model = {"t5": t5_checkpoint, "umt5": umt5_checkpoint}[kind][1]
    prompts = PROMPTS + [LONG_PROMPT]
    inputs = hf_tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                          return_tensors="np")
    expected_mask = inputs["attention_mask"].astype(bool)
    expected = _reference_states(model, inputs["input_ids"], expected_mask)

    tokens, mask = encoders[kind].encode(prompts)
    assert tokens.shape == (4, MAX_LENGTH, 64) and tokens.dtype == jnp.float32
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_allclose(tokens, expected * expected_mask[..., None], atol=1e-5, rtol=0)
    assert encoders[kind].dim == text.encoder_dim(kind, t5_checkpoint[0] if kind == "t5"
                                                  else umt5_checkpoint[0]) == 64


def test_long_prompts_are_truncated_with_one_warning(t5_checkpoint, caplog):
    encoder = text.get_text_encoder("t5", max_length=8, path=t5_checkpoint[0])
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            input_ids, mask = encoder.tokenize([LONG_PROMPT, "a cat"])
    assert input_ids[0, -1] == encoder.config.eos_token_id and mask[0].all() and not mask[1].all()
    warnings = [r for r in caplog.records if "Truncating" in r.getMessage()]
    assert len(warnings) == 1 and "max_length=8" in warnings[0].getMessage()


def test_sharded_loading_shards_parameters_and_keeps_outputs(t5_checkpoint, encoders):
    mesh = mesh_lib.make_mesh({"fsdp": 4, "tensor": 2})
    encoder = text.get_text_encoder("t5", max_length=MAX_LENGTH, path=t5_checkpoint[0], mesh=mesh,
                                    rules=mesh_lib.DEFAULT_RULES)
    layers = encoder.params["layers"]
    expected_specs = {
        "query": P(None, "fsdp", "tensor", None),
        "attention_out": P(None, "tensor", None, "fsdp"),
        "mlp_gate": P(None, "fsdp", "tensor"),
        "mlp_out": P(None, "tensor", "fsdp"),
    }
    for name, spec in expected_specs.items():
        array = layers[name]
        assert array.sharding.spec == spec, name
        shard = array.addressable_shards[0].data
        assert shard.size == array.size // 8, name
        # Each device holds its own slice of the checkpoint's tensor.
        unsharded = np.asarray(encoders["t5"].params["layers"][name])
        for s in array.addressable_shards:
            np.testing.assert_array_equal(np.asarray(s.data), unsharded[s.index])
    assert encoder.params["token_embedding"].addressable_shards[0].data.shape == (SMALL["vocab_size"], 16)

    tokens, mask = encoder.encode(PROMPTS)
    expected, expected_mask = encoders["t5"].encode(PROMPTS)
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_allclose(tokens, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("config, params", [(T5_XXL, 4.76e9), (UMT5_XXL, 5.68e9)])
def test_xxl_encoder_parameters_split_evenly_over_fsdp(config, params):
    """Shapes only: an XXL encoder in bf16 on an fsdp=8 mesh holds 1/8 of its bytes per device."""
    mesh = mesh_lib.make_mesh({"fsdp": 8})
    dummy = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(t5.T5Encoder(config, jnp.bfloat16).init, jax.random.key(0), dummy,
                           dummy.astype(bool))["params"]
    shardings = jax.tree.leaves(
        nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, mesh_lib.DEFAULT_RULES))
    leaves = jax.tree.leaves(nn.unbox(boxed))
    count = sum(leaf.size for leaf in leaves)
    total_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)
    per_device = sum(math.prod(s.shard_shape(leaf.shape)) * leaf.dtype.itemsize
                     for s, leaf in zip(shardings, leaves))
    assert count == pytest.approx(params, rel=0.005)
    assert total_bytes == pytest.approx(2 * count, rel=1e-4)  # bf16, but for the f32 norm scales
    assert per_device == pytest.approx(total_bytes / 8, rel=1e-3)


# Errors --------------------------------------------------------------------------------------------


def _copy_with_config(source, destination, **changes):
    shutil.copytree(source, destination)
    config = json.loads((destination / "config.json").read_text())
    (destination / "config.json").write_text(json.dumps(config | changes))
    return destination


def _rewritten(source, destination, edit):
    """A copy of a single-file checkpoint whose tensors went through `edit(dict)`."""
    shutil.copytree(source, destination)
    tensors = safetensors.numpy.load_file(str(source / "model.safetensors"))
    edit(tensors)
    safetensors.numpy.save_file(tensors, str(destination / "model.safetensors"))
    return destination


@pytest.mark.parametrize("changes, match", [
    (dict(model_type="bert"), "model_type='bert' is not a T5 encoder"),
    (dict(feed_forward_proj="relu"), "feed_forward_proj='relu' is not implemented"),
])
def test_config_refuses_models_it_does_not_implement(t5_checkpoint, tmp_path, changes, match):
    folder = _copy_with_config(t5_checkpoint[0], tmp_path / "copy", **changes)
    with pytest.raises(ValueError, match=match):
        t5.T5Config.from_json(folder / "config.json")


@pytest.mark.parametrize("lookup", [text.get_text_encoder, text.encoder_dim])
def test_encoder_name_must_match_the_checkpoint_model_type(t5_checkpoint, lookup):
    with pytest.raises(ValueError, match="model_type='t5', but the 'umt5' text encoder"):
        lookup("umt5", path=t5_checkpoint[0])


@pytest.mark.parametrize("lookup", [text.get_text_encoder, text.encoder_dim])
@pytest.mark.parametrize("name", ["t5", "umt5"])
def test_t5_encoders_need_a_path(name, lookup):
    with pytest.raises(ValueError, match="set config.text.path to a folder holding config.json"):
        lookup(name)


def test_loader_names_missing_and_unexpected_keys(t5_checkpoint, tmp_path):
    def edit(tensors):
        del tensors["encoder.block.1.layer.0.SelfAttention.k.weight"]
        tensors["encoder.block.2.layer.0.SelfAttention.relative_attention_bias.weight"] = np.zeros(
            (16, 4), np.float32)

    folder = _rewritten(t5_checkpoint[0], tmp_path / "copy", edit)
    with pytest.raises(ValueError, match=r"Missing keys: \['encoder.block.1.layer.0.SelfAttention.k.weight"
                                         r"'\]. Unexpected keys: \['encoder.block.2.*relative_attention"):
        t5.load_t5_params(folder, t5.T5Config.from_json(folder / "config.json"))


def test_loader_names_shape_mismatches(t5_checkpoint, tmp_path):
    def edit(tensors):
        tensors["encoder.block.2.layer.1.DenseReluDense.wi_0.weight"] = np.zeros((8, 64), np.float32)

    folder = _rewritten(t5_checkpoint[0], tmp_path / "copy", edit)
    with pytest.raises(ValueError, match=r"block.2.layer.1.DenseReluDense.wi_0.weight: \(8, 64\) in the "
                                         r"checkpoint, \(128, 64\) expected"):
        t5.load_t5_params(folder, t5.T5Config.from_json(folder / "config.json"))


def test_loader_takes_the_embedding_under_either_name(t5_checkpoint, encoders, tmp_path):
    folder = _rewritten(t5_checkpoint[0], tmp_path / "copy",
                        lambda t: t.update({"encoder.embed_tokens.weight": t.pop("shared.weight")}))
    params = t5.load_t5_params(folder, t5.T5Config.from_json(folder / "config.json"))
    jax.tree.map(np.testing.assert_array_equal, params, encoders["t5"].params)


def test_a_dit_trains_on_t5_text_from_an_encoder_sharded_over_its_mesh(t5_checkpoint):
    from sora_jax.training.experiment import Experiment
    from tests.helpers import tiny_config

    config = tiny_config(data=2, fsdp=4)
    config.text.update(encoder="t5", path=str(t5_checkpoint[0]), max_length=MAX_LENGTH)
    exp = Experiment(config)
    assert exp.model.text_dim == t5_checkpoint[1].config.d_model  # read from the checkpoint
    kernel = exp.text_encoder.params["layers"]["mlp_in"]
    assert kernel.sharding.mesh.shape == exp.mesh.shape
    assert kernel.addressable_shards[0].data.size == kernel.size // 4  # 'embed' over fsdp

    captions = np.array(PROMPTS * 3)[: config.data.batch_size]
    video = np.zeros((config.data.batch_size, config.data.frames, 16, 16, 3), np.float32)
    batch = exp.make_batch({"video": video, "caption": captions})
    assert batch["text"].shape == (config.data.batch_size, MAX_LENGTH, exp.model.text_dim)
    step = exp.jit_train_step(donate=False)
    with exp.activate():
        _, metrics = step(exp.init_state(jax.random.key(0)), batch, jax.random.key(1))
    assert np.isfinite(float(metrics["loss"]))

    config.text.dim = exp.model.text_dim + 1  # a declared width the checkpoint does not have
    with pytest.raises(ValueError, match=r"config.text.dim=.*set config.text.dim=64"):
        Experiment(config).text_encoder
