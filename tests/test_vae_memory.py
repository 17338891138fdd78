"""Chunked VAE decoding keeps device memory flat as the video grows.

Memory is XLA's analysis of the compiled programs (`benchmarks/vae.py`, which reports the same
numbers for the demo's VAE): nothing runs, so the test costs four compilations of a small decoder.
"""

import jax
import jax.numpy as jnp

from benchmarks import vae as vae_benchmark
from sora_jax.models import vae as vae_lib

CHUNK = 2  # latent frames per chunk: `decode_chunked`'s default
SIZE = 64  # pixels: large enough that activations, not weights, dominate memory


def test_decoding_a_video_8x_longer_needs_at_most_1_5x_the_memory_of_one_chunk():
    vae = vae_lib.CausalVAE(widths=(8, 16, 16), num_groups=4, patch_size=2, latent_channels=4,
                            temporal_compression=4, spatial_compression=4, mid_attention=False)
    stats = jax.ShapeDtypeStruct((vae.latent_channels,), jnp.float32)
    params = {"net": jax.eval_shape(vae.init_net, jax.random.key(0)), "shift": stats,
              "scale": stats}
    frame = (SIZE // 4, SIZE // 4, vae.latent_channels)
    # One chunk: 1 + 2 * 4 = 9 frames (3 latent frames); 8x longer: 73 frames (19 latent frames).
    one_chunk = vae_benchmark.chunked_decode_memory(vae, params, (1, CHUNK + 1) + frame, CHUNK)
    longer = vae_benchmark.chunked_decode_memory(vae, params, (1, 8 * CHUNK + 3) + frame, CHUNK)
    whole = vae_benchmark.decode_memory(vae, params, (1, 8 * CHUNK + 3) + frame)

    assert longer["peak_bytes"] <= 1.5 * one_chunk["peak_bytes"], (longer, one_chunk)
    # The measurement can fail: decoding the longer video whole needs more.
    assert whole > 1.5 * one_chunk["peak_bytes"], (whole, one_chunk)
