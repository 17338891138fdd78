"""Random conditioning masks: the strategies, their draw, and given positions in both training paths."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sora_jax.data.packing import pack
from sora_jax.diffusion.flow import RectifiedFlow
from sora_jax.diffusion.masks import (MASK_STRATEGIES, check_mask_weights, sample_given,
                                     sample_slot_given, with_end_image)
from sora_jax.models.dit import DiT
from sora_jax.training.state import Group, TrainState
from sora_jax.training.step import (draw_noise, draw_packed_noise, flow_loss, make_packed_train_step,
                                    make_train_step, packed_flow_loss)

PATCH = (1, 2, 2)
# One unrolled block: these tests are about what enters the loss, not the network.
MODEL = DiT(in_channels=3, patch_size=PATCH, width=32, depth=1, num_heads=2, text_dim=8)
LENGTHS = (0, 1, 2, 3, 5, 8)  # 0: an unused clip slot; 1: an image
# Every strategy but end_image, which needs end images in the batch (tested on its own below).
ALL = {name: 1.0 for name in MASK_STRATEGIES if name != "end_image"}


def _normal(seed, shape):
    return np.asarray(np.random.default_rng(seed).normal(size=shape), np.float32)


@pytest.fixture(scope="module")
def params():
    """Parameters as after some training, drawn without compiling init."""
    args = (np.zeros((1, 2, 4, 4, 3)), np.zeros((1, 2)), np.zeros((1, 5, 8)), np.ones((1, 5), bool))
    abstract = nn.unbox(jax.eval_shape(MODEL.init, jax.random.key(0), *args)["params"])

    def draw(path, leaf):
        return jnp.asarray((path[-1].key == "scale") + 0.2 * _normal(leaf.size, leaf.shape))
    return jax.tree_util.tree_map_with_path(draw, abstract)


def _grid_batch(batch=4, frames=4):
    return {"latent": jnp.asarray(_normal(0, (batch, frames, 4, 4, 3))),
            "text": jnp.asarray(_normal(1, (batch, 5, 8))),
            "text_mask": jnp.arange(5)[None] < jnp.array([[5], [3], [1], [4]])[:batch]}


def _packed_batch():
    """Clips of 4, 1 (an image), 3, 2 and 5 temporal positions in two rows, with padding slots."""
    clips = [{"latent": _normal(i, (frames, 2, 4, 3)), "text": _normal(10 + i, (4, 8)),
              "text_mask": np.arange(4) < 2 + i % 3, "frames": frames, "fps": 24.0, "height": 16,
              "width": 32}
             for i, frames in enumerate((4, 1, 3, 2, 5))]
    packed = pack(clips, seq_len=40, max_clips=3, max_slots=10, patch_size=PATCH)
    assert packed["tokens"].shape[0] == 2 and np.any(packed["slot_clip"] == 0)
    return jax.tree.map(jnp.asarray, packed)


def _check_pattern(strategy: str, given: np.ndarray, length: int) -> int:
    """Asserts given [max_len] is a draw of strategy for a clip of this length; returns the count."""
    assert not given[length:].any(), "a position beyond the clip is given"
    positions = np.flatnonzero(given).tolist()
    if length <= 1:
        assert not positions, "an image (or an unused slot) is given something"
        return 0
    assert len(positions) < length, "every position is given"
    expected = {
        "none": [[]],
        "first_frame": [[0]],
        "last_frame": [[length - 1]],
        "first_last": [[0, length - 1]] if length > 2 else [[0], [1]],
        "end_image": [[0, length - 1]] if length > 2 else [[0], [1]],
        "prefix": [list(range(k)) for k in range(1, length)],
        "suffix": [list(range(length - k, length)) for k in range(1, length)],
    }
    if strategy != "random":
        assert positions in expected[strategy], (strategy, length, positions)
    return len(positions)


# The strategies ----------------------------------------------------------------------------------


def test_mask_weights_are_checked_naming_the_bad_key_and_the_valid_ones():
    assert check_mask_weights(None) is None and check_mask_weights({}) is None
    assert check_mask_weights({"prefix": 1, "random": 0}) == {"prefix": 1.0, "random": 0.0}
    with pytest.raises(ValueError, match="'prefixx'.*valid: none, first_frame, .*, random"):
        check_mask_weights({"prefixx": 1.0})
    with pytest.raises(ValueError, match="'suffix' must be finite and non-negative, got -1.0"):
        check_mask_weights({"prefix": 1.0, "suffix": -1.0})
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="'random' must be finite"):
            check_mask_weights({"random": bad})
    with pytest.raises(ValueError, match="'none' must be a number"):
        check_mask_weights({"none": "lots"})
    with pytest.raises(ValueError, match="all zero"):
        check_mask_weights({"prefix": 0.0, "suffix": 0})
    with pytest.raises(ValueError, match="'firstframe'"):
        make_train_step(MODEL, RectifiedFlow(), tx=optax.sgd(1.0), schedule=lambda s: 1.0, ema_decay=0.0,
                        caption_dropout=0.0, temporal_patch=1, mask_weights={"firstframe": 1.0})


def test_strategies_are_drawn_in_proportion_to_their_weights():
    weights = {"none": 1.0, "first_frame": 2.0, "last_frame": 3.0, "first_last": 4.0, "prefix": 0.0}
    n, length = 20_000, 8
    given = np.asarray(sample_given(jax.random.key(0), weights, jnp.full((n,), length), length))
    patterns = {"none": [], "first_frame": [0], "last_frame": [7], "first_last": [0, 7]}
    for name, positions in patterns.items():
        frequency = np.mean(np.all(given == np.isin(np.arange(length), positions), axis=1))
        # Within about 4 standard deviations (at most 0.0035 here).
        assert frequency == pytest.approx(weights[name] / 10, abs=0.015), name
    recognised = sum(np.all(given == np.isin(np.arange(length), p), axis=1) for p in patterns.values())
    np.testing.assert_array_equal(recognised, 1)  # no zero-weight (prefix) draws


@pytest.mark.parametrize("strategy", MASK_STRATEGIES)
def test_each_strategy_gives_its_documented_positions_and_leaves_one_generated(strategy):
    lengths = np.tile(LENGTHS, 200)
    given = np.asarray(sample_given(jax.random.key(1), {strategy: 1.0}, jnp.asarray(lengths), 8))
    assert given.shape == (len(lengths), 8) and given.dtype == bool
    counts = {length: [] for length in LENGTHS}
    for row, length in zip(given, lengths):
        counts[length].append(_check_pattern(strategy, row, length))
    if strategy in ("prefix", "suffix"):
        assert set(counts[5]) == {1, 2, 3, 4}  # k uniform in [1, length - 1]
    if strategy == "first_last":  # at length 2 one of the two, each about half the time
        assert np.mean(given[lengths == 2, 0]) == pytest.approx(0.5, abs=0.15)
    if strategy == "random":
        assert np.mean(counts[8]) / 8 == pytest.approx(0.5, abs=0.07)
        assert max(counts[3]) == 2  # all-but-one happens; all never does


def test_each_packed_clip_gets_one_draw_over_its_own_slots():
    batch = _packed_batch()
    slot_clip = np.asarray(batch["slot_clip"])
    for strategy in ("first_frame", "last_frame", "first_last", "prefix", "suffix", "random"):
        for seed in range(5):
            draw = draw_packed_noise(RectifiedFlow(), batch, jax.random.key(seed), caption_dropout=0.0,
                                     mask_weights={strategy: 1.0})
            given, t = np.asarray(draw["given"]), np.asarray(draw["t"])
            assert not given[slot_clip == 0].any()
            np.testing.assert_array_equal(t[given], 0.0)
            for r, m in zip(*np.nonzero(np.asarray(batch["clip_id"]) >= 0)):
                slots = slot_clip[r] == m + 1
                _check_pattern(strategy, given[r, slots], int(slots.sum()))
                generated = t[r, slots & ~given[r]]
                assert np.all(generated > 0) and np.all(generated == generated[0])  # one time per clip
    # The same per-clip draw as `sample_given` on the clips' lengths, gathered to their slots.
    rng = jax.random.key(7)
    lengths = np.sum(slot_clip[..., None] == np.arange(1, 4), axis=1)  # [R, M]
    per_clip = np.asarray(sample_given(rng, ALL, jnp.asarray(lengths.reshape(-1)), 10)).reshape(2, 3, 10)
    per_slot = np.asarray(sample_slot_given(rng, ALL, batch["slot_clip"], 3))
    for r, m in zip(*np.nonzero(lengths)):
        np.testing.assert_array_equal(per_slot[r, slot_clip[r] == m + 1], per_clip[r, m, :lengths[r, m]])


# Given positions in training ---------------------------------------------------------------------


def test_grid_draw_sets_given_positions_to_time_zero_and_no_masks_draws_as_before():
    latent = jnp.zeros((64, 8, 2, 2, 3))
    draw = draw_noise(RectifiedFlow(), latent, jax.random.key(0), caption_dropout=0.0, temporal_patch=2,
                      mask_weights=ALL)
    given, t = np.asarray(draw["given"]), np.asarray(draw["t"])
    assert given.shape == t.shape == (64, 4) and 0 < given.mean() < 1
    assert np.all(given.sum(1) < 4)
    np.testing.assert_array_equal(t[given], 0.0)
    for row_t, row_given in zip(t, given):
        assert np.all(row_t[~row_given] > 0) and len(set(row_t[~row_given])) == 1
    plain = draw_noise(RectifiedFlow(), latent, jax.random.key(0), caption_dropout=0.0, temporal_patch=2)
    assert "given" not in plain and np.all(np.asarray(plain["t"]) > 0)


def test_given_frames_are_out_of_the_grid_loss(params):
    flow = RectifiedFlow()
    batch = _grid_batch()
    batch = {**batch, **draw_noise(flow, batch["latent"], jax.random.key(2), caption_dropout=0.0,
                                   temporal_patch=1, mask_weights={"first_last": 1.0})}
    np.testing.assert_array_equal(batch["given"], np.isin(np.arange(4), [0, 3])[None].repeat(4, 0))
    loss = jax.jit(lambda b: flow_loss(MODEL, flow, params, b))
    ref = float(loss(batch))
    # Given frames are clean, so their noise reaches neither the network nor (masked) the loss.
    at_given = {**batch, "noise": batch["noise"].at[:, 0].add(3.0).at[:, 3].multiply(-2.0)}
    assert float(loss(at_given)) == pytest.approx(ref, rel=1e-6)
    at_generated = {**batch, "noise": batch["noise"].at[:, 1].add(3.0)}
    assert abs(float(loss(at_generated)) - ref) > 1e-3
    # The same noise does count when those frames are to be generated at t = 0.
    unmasked = {**batch, "given": jnp.zeros_like(batch["given"])}
    assert abs(float(loss({**at_given, "given": unmasked["given"]})) - float(loss(unmasked))) > 1e-3


def test_tokens_of_given_slots_are_out_of_the_packed_loss(params):
    flow = RectifiedFlow()
    batch = _packed_batch()
    batch = {**batch, **draw_packed_noise(flow, batch, jax.random.key(3), caption_dropout=0.0,
                                          mask_weights={"prefix": 1.0, "suffix": 1.0})}
    given_tokens = np.take_along_axis(np.asarray(batch["given"]), np.asarray(batch["slot"]), axis=1)
    generated = (np.asarray(batch["segment_ids"]) > 0) & ~given_tokens
    assert given_tokens.any() and generated.any()
    loss = jax.jit(lambda p, b: packed_flow_loss(MODEL, flow, p, b))

    # A zero final layer predicts zero velocity: the loss is then the mean of (noise - x0)^2 over the
    # generated tokens' values alone.
    silent = {**params, "final_layer": jax.tree.map(jnp.zeros_like, params["final_layer"])}
    target = np.square(np.asarray(batch["noise"]) - np.asarray(batch["tokens"]))
    assert float(loss(silent, batch)) == pytest.approx(target[generated].mean(), rel=1e-5)

    ref = float(loss(params, batch))
    noise = np.asarray(batch["noise"]).copy()
    noise[given_tokens] += 3.0
    assert float(loss(params, {**batch, "noise": jnp.asarray(noise)})) == pytest.approx(ref, rel=1e-6)
    noise[generated.nonzero()[0][0], generated.nonzero()[1][0]] += 3.0
    assert abs(float(loss(params, {**batch, "noise": jnp.asarray(noise)})) - ref) > 1e-4


@pytest.mark.parametrize("path", ["grid", "packed"])
def test_a_train_step_with_masks_reports_the_given_fraction_and_a_finite_loss(params, path):
    tx = optax.sgd(1e-3)
    state = TrainState(step=jnp.zeros((), jnp.int32), groups={"dit": Group.create(params, tx, 0.0)})
    kw = dict(tx=tx, schedule=lambda s: 1e-3, ema_decay=0.0, caption_dropout=0.1, mask_weights=ALL)
    if path == "grid":
        step, batch = make_train_step(MODEL, RectifiedFlow(), temporal_patch=1, **kw), _grid_batch()
    else:
        step, batch = make_packed_train_step(MODEL, RectifiedFlow(), **kw), _packed_batch()
    new_state, metrics = jax.jit(step)(state, batch, jax.random.key(0))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    assert 0 < float(metrics["given_fraction"]) < 1
    assert int(new_state.step) == 1


# End images ----------------------------------------------------------------------------------------


def test_end_image_draws_are_reported_for_clips_that_hold_one():
    lengths = jnp.asarray(np.tile(LENGTHS, 100))
    weights = {"end_image": 1.0, "first_last": 1.0}
    given, drew = sample_given(jax.random.key(4), weights, lengths, 8, return_end_image=True)
    given, drew, lengths = np.asarray(given), np.asarray(drew), np.asarray(lengths)
    assert not drew[lengths <= 2].any()  # too short: a clip keeps a latent to generate
    long = lengths > 2
    assert 0.4 < drew[long].mean() < 0.6  # about half of the long clips drew end_image
    for row, length in zip(given[drew], lengths[drew]):  # they give their first and last positions
        assert np.flatnonzero(row).tolist() == [0, length - 1]
    np.testing.assert_array_equal(
        given, np.asarray(sample_given(jax.random.key(4), weights, jnp.asarray(lengths), 8)))


def test_with_end_image_replaces_the_last_frame_of_the_clips_that_drew_it():
    latent, end = _normal(0, (3, 4, 2, 2, 3)), _normal(1, (3, 1, 2, 2, 3))
    out = np.asarray(with_end_image(jnp.asarray(latent), jnp.asarray(end), jnp.asarray([True, False, True])))
    np.testing.assert_array_equal(out[:, :3], latent[:, :3])
    np.testing.assert_array_equal(out[[0, 2], 3], end[[0, 2], 0])
    np.testing.assert_array_equal(out[1, 3], latent[1, 3])


@pytest.mark.parametrize("weights, unread", [({"end_image": 1.0}, "latent"),
                                             ({"first_last": 1.0}, "end_latent")])
def test_a_train_step_reads_the_end_image_in_place_of_the_last_frame(params, weights, unread):
    """NaN where the step must not look: the last latent frame of clips holding their end image, or
    the end images of clips that drew another strategy. Any read would make the loss NaN."""
    tx = optax.sgd(1e-3)
    state = TrainState(step=jnp.zeros((), jnp.int32), groups={"dit": Group.create(params, tx, 0.0)})
    batch = {**_grid_batch(), "end_latent": jnp.asarray(_normal(3, (4, 1, 4, 4, 3)))}
    batch[unread] = batch[unread].at[:, -1].set(jnp.nan)
    step = make_train_step(MODEL, RectifiedFlow(), tx=tx, schedule=lambda s: 1e-3, ema_decay=0.0,
                           caption_dropout=0.0, temporal_patch=1, mask_weights=weights)
    _, metrics = jax.jit(step)(state, batch, jax.random.key(0))
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    read = "end_latent" if unread == "latent" else "latent"
    poisoned = {**batch, read: batch[read].at[:, -1].set(jnp.nan)}
    _, metrics = jax.jit(step)(state, poisoned, jax.random.key(0))
    assert np.isnan(float(metrics["loss"]))  # a NaN where the step does look


def test_end_image_is_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match="end_image mask needs clips of one size"):
        sample_slot_given(jax.random.key(0), {"end_image": 1.0}, _packed_batch()["slot_clip"], 3)
    with pytest.raises(ValueError, match="temporal patch of 1"):
        draw_noise(RectifiedFlow(), jnp.zeros((2, 4, 2, 2, 3)), jax.random.key(0), caption_dropout=0.0,
                   temporal_patch=2, mask_weights={"end_image": 1.0})
