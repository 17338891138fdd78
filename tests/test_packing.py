"""NaViT-style packing: the host-side packer, the DiT on packed rows, size conditioning, the packed loss."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sora_jax.data.packing import pack, packing_efficiency, size_features, slot_values, unpack
from sora_jax.diffusion.flow import RectifiedFlow
from sora_jax.models import attention
from sora_jax.models.dit import DiT, SizeEmbedder
from sora_jax.models.patch import grid_positions, patchify, rope, rope_3d
from sora_jax.training.state import Group, TrainState
from sora_jax.training.step import draw_packed_noise, make_packed_train_step, packed_flow_loss

PATCH = (1, 2, 2)
# Looped blocks compile once, which keeps this file fast; test_models shows loop and unrolled agree.
MODEL = dict(in_channels=3, patch_size=PATCH, width=32, depth=2, num_heads=2, text_dim=8, scan_layers=True)
# (latent [t, h, w, c], caption length, real caption tokens): 12, 6 (a 1-frame image) and 12 tokens.
CLIPS = [((2, 4, 6, 3), 5, 5), ((1, 6, 4, 3), 3, 2), ((3, 4, 4, 3), 4, 4)]
SEQ_LEN, MAX_CLIPS, MAX_SLOTS = 32, 3, 8


def _normal(seed, shape, scale=1.0):
    return np.asarray(scale * np.random.default_rng(seed).normal(size=shape), np.float32)


def _clips(seed=0):
    return [{"latent": _normal(seed + i, shape), "text": _normal(seed + 10 + i, (length, 8)),
             "text_mask": np.arange(length) < real, "frames": 1 + 4 * (shape[0] - 1), "fps": 24.0,
             "height": 8 * shape[1], "width": 8 * shape[2]}
            for i, (shape, length, real) in enumerate(CLIPS)]


def _times(seed=0):
    """A different time per temporal position of each clip."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(size=shape[0] // PATCH[0]).astype(np.float32) for shape, _, _ in CLIPS]


def _perturbed(params, scale=0.2):
    return jax.tree.map(lambda p: p + _normal(p.size, p.shape, scale), params)


def _abstract_params(model):
    clip = _clips()[0]
    args = (clip["latent"][None], np.zeros((1, 2)), clip["text"][None], clip["text_mask"][None], None,
            np.ones((1, 5)))
    return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *args)["params"])


def _random_params(model):
    """Parameters as after some training (every gate open), without compiling init: norm scales
    near one, everything else near zero."""
    def draw(path, leaf):
        centre = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(centre + _normal(leaf.size, leaf.shape, 0.2))
    return jax.tree_util.tree_map_with_path(draw, _abstract_params(model))


@pytest.fixture(scope="module")
def params():
    return _random_params(DiT(**MODEL, size_conditioning=True))


@functools.cache
def _apply(backend="xla"):
    """Jitted (grid, packed) forward passes of the size-conditioned DiT with this attention backend."""
    model = DiT(**MODEL, size_conditioning=True, attention_backend=backend)
    grid = jax.jit(lambda p, *args: model.apply({"params": p}, *args))
    packed = jax.jit(lambda p, tokens, t, text, mask, layout: model.apply(
        {"params": p}, tokens, t, text, mask, **layout, method="packed"))
    return grid, packed


def _run_packed(params, packed, t, drop=None, backend="xla"):
    layout = {k: jnp.asarray(packed[k]) for k in ("segment_ids", "positions", "slot", "slot_clip", "sizes")}
    layout["drop_text"] = None if drop is None else jnp.asarray(drop)
    return _apply(backend)[1](params, packed["tokens"], t, packed["text"], packed["text_mask"], layout)


# The packer ------------------------------------------------------------------------------------


def test_unpack_returns_every_packed_clip():
    clips = _clips()
    packed = pack(clips, seq_len=SEQ_LEN, max_clips=MAX_CLIPS, max_slots=MAX_SLOTS, patch_size=PATCH)
    for i, clip in enumerate(clips):
        np.testing.assert_array_equal(unpack(packed["tokens"], packed, i), clip["latent"])
    with pytest.raises(ValueError, match="clip 3 is not in this packed batch"):
        unpack(packed["tokens"], packed, 3)


def test_packed_rows_lay_out_tokens_positions_segment_ids_and_slots_as_documented():
    clips = _clips()
    packed = pack(clips, seq_len=SEQ_LEN, max_clips=MAX_CLIPS, max_slots=MAX_SLOTS, patch_size=PATCH,
                  text_len=6)
    assert packed["tokens"].shape == (1, SEQ_LEN, 12) and packed["tokens"].dtype == np.float32
    # First-fit decreasing: the two 12-token clips (in their given order), then the 6-token image.
    np.testing.assert_array_equal(packed["clip_id"], [[0, 2, 1]])
    order, start, first_slot = [0, 2, 1], 0, 0
    for m, i in enumerate(order):
        latent = clips[i]["latent"]
        grid = tuple(s // p for s, p in zip(latent.shape, PATCH))
        n = int(np.prod(grid))
        span = slice(start, start + n)
        np.testing.assert_array_equal(packed["tokens"][0, span], patchify(latent[None], PATCH)[0])
        np.testing.assert_array_equal(packed["segment_ids"][0, span], m + 1)
        np.testing.assert_array_equal(packed["positions"][0, span], grid_positions(grid))
        np.testing.assert_array_equal(packed["slot"][0, span], first_slot + grid_positions(grid)[:, 0])
        np.testing.assert_array_equal(packed["slot_clip"][0, first_slot:first_slot + grid[0]], m + 1)
        caption = len(clips[i]["text_mask"])
        np.testing.assert_array_equal(packed["text"][0, m, :caption], clips[i]["text"])
        np.testing.assert_array_equal(packed["text_mask"][0, m], np.arange(6) < clips[i]["text_mask"].sum())
        np.testing.assert_array_equal(packed["sizes"][0, m], size_features(
            clips[i]["frames"], 24.0, clips[i]["height"], clips[i]["width"]))
        np.testing.assert_array_equal(packed["latent_shape"][0, m], latent.shape)
        start, first_slot = start + n, first_slot + grid[0]
    assert start == 30 and first_slot == 6
    np.testing.assert_array_equal(packed["segment_ids"][0, 30:], 0)  # padding
    np.testing.assert_array_equal(packed["tokens"][0, 30:], 0.0)
    np.testing.assert_array_equal(packed["slot_clip"][0, 6:], 0)  # unused slots
    assert packed["sizes"][0, 0, 4] == pytest.approx(32 / 48)  # aspect = height / width
    times = _times()
    np.testing.assert_array_equal(slot_values(packed, times)[0, :6],
                                  np.concatenate([times[0], times[2], times[1]]))


def test_rows_respect_the_token_clip_and_slot_limits_and_report_their_efficiency():
    clips = _clips()
    tight = pack(clips, seq_len=16, max_clips=3, max_slots=8, patch_size=PATCH)
    assert tight["tokens"].shape[0] == 3  # 12 + 6 > 16: every clip gets its own row
    assert packing_efficiency(tight) == pytest.approx(30 / 48)
    one_slot_each = pack(clips, seq_len=SEQ_LEN, max_clips=1, max_slots=8, patch_size=PATCH)
    assert one_slot_each["clip_id"].tolist() == [[0], [2], [1]]
    few_slots = pack(clips, seq_len=SEQ_LEN, max_clips=3, max_slots=4, patch_size=PATCH)
    assert few_slots["clip_id"].tolist() == [[0, 1, -1], [2, -1, -1]]  # 2 + 1 slots, then 3
    padded = pack(clips, seq_len=SEQ_LEN, max_clips=3, max_slots=8, patch_size=PATCH, num_rows=2)
    assert padded["segment_ids"].shape == (2, SEQ_LEN)
    assert packing_efficiency(padded) == pytest.approx(30 / 64)


def test_clips_that_cannot_fit_are_rejected_naming_their_size_and_the_packing_length():
    clips = _clips()
    with pytest.raises(ValueError, match=r"clip 0 of latent shape \(2, 4, 6, 3\) makes 12 tokens.*seq_len=8"):
        pack(clips, seq_len=8, max_clips=3, max_slots=8, patch_size=PATCH)
    with pytest.raises(ValueError, match="clip 2 .* max_slots=2"):
        pack(clips, seq_len=SEQ_LEN, max_clips=3, max_slots=2, patch_size=PATCH)
    with pytest.raises(ValueError, match="need 3 packed rows of seq_len=16, more than num_rows=2"):
        pack(clips, seq_len=16, max_clips=3, max_slots=8, patch_size=PATCH, num_rows=2)
    with pytest.raises(ValueError, match=r"clip 1: latent of shape \(1, 5, 4, 3\) is not"):
        pack([clips[0], {**clips[1], "latent": np.zeros((1, 5, 4, 3))}], seq_len=SEQ_LEN, max_clips=3,
             max_slots=8, patch_size=PATCH)


def test_rope_from_per_token_positions_equals_rope_3d_of_the_grid():
    packed = pack(_clips(), seq_len=SEQ_LEN, max_clips=MAX_CLIPS, max_slots=MAX_SLOTS, patch_size=PATCH)
    cos, sin = rope(packed["positions"], head_dim=16)
    assert cos.shape == (1, SEQ_LEN, 8)
    ref_cos, ref_sin = rope_3d((3, 2, 2), head_dim=16)  # the second clip in the row, tokens 12..23
    np.testing.assert_array_equal(cos[0, 12:24], ref_cos)
    np.testing.assert_array_equal(sin[0, 12:24], ref_sin)


# The DiT on packed rows ------------------------------------------------------------------------


BACKENDS = [b for b in ("xla", "cpu", "splash") if b in attention.BACKENDS]


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_dit_gives_each_clip_the_output_it_gets_alone(params, backend):
    clips, times = _clips(), _times()
    packed = pack(clips, seq_len=128 if backend == "splash" else SEQ_LEN, max_clips=MAX_CLIPS,
                  max_slots=MAX_SLOTS, patch_size=PATCH)  # splash works in blocks of 128 tokens
    drop = np.zeros((1, MAX_CLIPS), bool)
    drop[packed["clip_id"] == 2] = True  # the third clip sees the null caption
    out = _run_packed(params, packed, slot_values(packed, times), drop, backend)
    assert out.shape == packed["tokens"].shape and bool(jnp.all(jnp.isfinite(out)))

    alone = _apply(backend)[0]
    for i, clip in enumerate(clips):
        sizes = size_features(clip["frames"], clip["fps"], clip["height"], clip["width"])
        ref = alone(params, clip["latent"][None], times[i][None], clip["text"][None],
                    clip["text_mask"][None], jnp.array([i == 2]), sizes[None])[0]
        assert float(jnp.std(ref)) > 1e-2
        # 'cpu' rounds q, k and v to bf16, where a different summation order can flip a rounding.
        tolerance = 2e-3 if backend == "cpu" else 1e-5
        np.testing.assert_allclose(unpack(np.asarray(out), packed, i), ref, atol=tolerance, rtol=tolerance)


def test_a_packed_clip_is_unaffected_by_the_other_clips_in_its_row(params):
    clips, times = _clips(), _times()
    packed = pack(clips, seq_len=SEQ_LEN, max_clips=MAX_CLIPS, max_slots=MAX_SLOTS, patch_size=PATCH)
    out = _run_packed(params, packed, slot_values(packed, times))
    others = [clips[0]] + _clips(seed=50)[1:]  # new latents and captions for clips 1 and 2
    others[2] = {**others[2], "height": 64, "width": 16}
    repacked = pack(others, seq_len=SEQ_LEN, max_clips=MAX_CLIPS, max_slots=MAX_SLOTS, patch_size=PATCH)
    changed = _run_packed(params, repacked, slot_values(repacked, [times[0], 1 - times[1], 1 - times[2]]))
    np.testing.assert_allclose(unpack(np.asarray(changed), repacked, 0), unpack(np.asarray(out), packed, 0),
                               atol=1e-6)
    for i in (1, 2):
        difference = unpack(np.asarray(changed), repacked, i) - unpack(np.asarray(out), packed, i)
        assert np.max(np.abs(difference)) > 1e-3


def test_packed_dit_rejects_inputs_of_the_wrong_shape(params):
    packed = pack(_clips(), seq_len=SEQ_LEN, max_clips=MAX_CLIPS, max_slots=MAX_SLOTS, patch_size=PATCH)
    with pytest.raises(ValueError, match=r"packed DiT input t has shape \(1, 6\); expected \(1, 8\)"):
        _run_packed(params, packed, np.zeros((1, 6), np.float32))


# Size conditioning -----------------------------------------------------------------------------


def test_size_conditioning_adds_parameters_only_when_on_and_starts_as_a_no_op(params):
    plain = {k: v for k, v in params.items() if k != "size_embedder"}
    assert "size_embedder" in params
    assert jax.tree.structure(_abstract_params(DiT(**MODEL))) == jax.tree.structure(plain)
    sizes = jnp.asarray(size_features(5, 24, 32, 48))
    initial = nn.unbox(SizeEmbedder(MODEL["width"]).init(jax.random.key(0), sizes)["params"])
    with_sizes = {**plain, "size_embedder": initial}

    clip = _clips()[0]
    args = (clip["latent"][None], _times()[0][None], clip["text"][None], clip["text_mask"][None], None)
    off, on = (jax.jit(lambda p, sizes, model=model: model.apply({"params": p}, *args, sizes))
               for model in (DiT(**MODEL), DiT(**MODEL, size_conditioning=True)))
    small, large = size_features(5, 24, 32, 48)[None], size_features(17, 8, 256, 128)[None]
    out = off(plain, small)  # sizes are ignored without size conditioning
    np.testing.assert_array_equal(on(with_sizes, small), out)
    trained = {**with_sizes, "size_embedder": _perturbed(with_sizes["size_embedder"])}
    assert float(jnp.max(jnp.abs(on(trained, small) - out))) > 1e-3
    assert float(jnp.max(jnp.abs(on(trained, large) - on(trained, small)))) > 1e-3
    with pytest.raises(ValueError, match="size_conditioning needs sizes"):
        DiT(**MODEL, size_conditioning=True).apply({"params": with_sizes}, *args)


# The packed loss and train step ----------------------------------------------------------------


def _packed_batch():
    """Two rows of 30 clip tokens and 2 padding tokens each."""
    packed = pack(_clips() + _clips(seed=20), seq_len=SEQ_LEN, max_clips=MAX_CLIPS, max_slots=MAX_SLOTS,
                  patch_size=PATCH)
    assert packed["tokens"].shape[0] == 2
    return jax.tree.map(jnp.asarray, packed)


def test_one_time_per_clip_reaches_all_its_slots_and_captions_drop_per_clip():
    flow = RectifiedFlow()
    batch = _packed_batch()
    draw = jax.jit(lambda b: draw_packed_noise(flow, b, jax.random.key(3), caption_dropout=0.5))(batch)
    assert draw["t"].shape == (2, MAX_SLOTS) and draw["drop_text"].shape == (2, MAX_CLIPS)
    assert draw["noise"].shape == batch["tokens"].shape
    t, slot_clip = np.asarray(draw["t"][0]), np.asarray(batch["slot_clip"][0])
    for m in (1, 2, 3):
        assert len(set(t[slot_clip == m])) == 1
    assert len(set(t[slot_clip > 0])) == 3


def test_padding_tokens_are_excluded_from_the_packed_loss(params):
    model, flow = DiT(**MODEL, size_conditioning=True), RectifiedFlow()
    batch = _packed_batch()
    batch = {**batch, **draw_packed_noise(flow, batch, jax.random.key(1), caption_dropout=0.0)}
    loss = jax.jit(lambda b: packed_flow_loss(model, flow, params, b))
    ref = loss(batch)
    padding = (batch["segment_ids"] == 0)[..., None]
    assert bool(jnp.any(padding))
    noisy_padding = {**batch, "tokens": jnp.where(padding, 100.0, batch["tokens"]),
                     "noise": jnp.where(padding, -50.0, batch["noise"])}
    np.testing.assert_allclose(loss(noisy_padding), ref, rtol=1e-6)
    moved = {**batch, "tokens": batch["tokens"].at[0, 0].add(1.0)}
    assert abs(float(loss(moved)) - float(ref)) > 1e-4


def test_packed_train_step_updates_parameters_and_reports_packing_efficiency():
    # One block and plain SGD: the backward pass dominates this file's compile time.
    model = DiT(**{**MODEL, "depth": 1, "scan_layers": False}, size_conditioning=True)
    params, tx = _random_params(model), optax.sgd(1e-3)
    state = TrainState(step=jnp.zeros((), jnp.int32), groups={"dit": Group.create(params, tx, 0.0)})
    step = make_packed_train_step(model, RectifiedFlow(), tx=tx, schedule=lambda s: 1e-3, ema_decay=0.0,
                                  caption_dropout=0.1)
    batch = _packed_batch()
    new_state, metrics = jax.jit(step)(state, batch, jax.random.key(0))
    assert float(metrics["packing_efficiency"]) == pytest.approx(packing_efficiency(batch))
    assert float(metrics["packing_efficiency"]) == pytest.approx(60 / 64)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    assert int(new_state.step) == 1
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new_state.groups["dit"].params, params)
    assert max(jax.tree.leaves(moved)) > 1e-5
