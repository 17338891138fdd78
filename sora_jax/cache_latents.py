r"""Encodes a DiT config's dataset once with its VAE and text encoder: the latent cache.

  python -m sora_jax.cache_latents --config=configs/moving_shapes.py [--splits=train,validation]

Writes to `config.data.latent_cache` (or --out), which DiT training with that config then reads
instead of pixels. An existing complete cache is kept (and reported); delete it to rebuild.
See data/latent_cache.py for the format.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "The DiT config whose data to encode.")
_OUT = flags.DEFINE_string("out", None, "Cache folder (default: config.data.latent_cache).")
_SPLITS = flags.DEFINE_list("splits", None, "Splits to encode (default: the config's train and "
                                            "validation splits).")
flags.mark_flags_as_required(["config"])


def cache_latents(config, out: str | None = None, splits: list[str] | None = None) -> str:
    """Writes the latent cache of `config` and returns its folder; a finished one is reused."""
    import jax
    import tqdm

    from sora_jax.data import latent_cache, pipeline
    from sora_jax.parallel import mesh as mesh_lib
    from sora_jax.training.experiment import Experiment, text_identity
    from sora_jax.training.text_cache import CachedTextEncoder

    out = out or config.data.get("latent_cache")
    if not out:
        raise ValueError("No cache folder: set config.data.latent_cache or pass --out.")
    if os.path.exists(os.path.join(out, latent_cache.METADATA)):
        logging.info("Latent cache %s exists; keeping it (delete it to rebuild).", out)
        return out
    # Clips are encoded on one device (batches of any size); the text encoder's parameters stay
    # sharded over the config's mesh of all devices.
    text_mesh = mesh_lib.make_mesh(dict(config.mesh), jax.devices())
    with config.unlocked():
        config.data.latent_cache = None  # read pixels
        config.mesh = dict(data=1, fsdp=1, tensor=1, sequence=1)
    exp = Experiment(config, devices=jax.devices()[:1])
    splits = splits or [config.data.train_split, config.data.validation_split]
    data_kw = pipeline.data_kwargs(config.data)
    text_encoder = CachedTextEncoder(exp.make_text_encoder(text_mesh))

    collate = "list" if config.data.get("batching") else "stack"  # clips of many sizes

    def batches(split):
        loader = pipeline.make_loader(**data_kw, split=split, batch_size=config.data.batch_size,
                                      seed=0, shuffle=False, num_epochs=1, drop_remainder=False,
                                      shard_options=None, collate=collate)
        yield from loader

    bars = {}

    def progress(split, count):
        if split not in bars:
            bars[split] = tqdm.tqdm(desc=f"encode {split}", unit="clip", mininterval=5)
        bars[split].update(count - bars[split].n)

    ae_config = config.autoencoder.to_dict()
    metadata = {"dataset": f"{config.data.name}/{config.data.builder_config}",
                "autoencoder": {k: v for k, v in ae_config.items()},
                "text": text_identity(config.text)}
    latent_cache.write_cache(out, {s: batches(s) for s in splits}, encode_video=exp.encode_video,
                             encode_text=text_encoder, metadata=metadata, progress=progress,
                             end_frame=exp.end_frame)
    for bar in bars.values():
        bar.close()
    logging.info("Wrote the latent cache %s.", out)
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    print(cache_latents(_CONFIG.value, _OUT.value, _SPLITS.value))


if __name__ == "__main__":
    app.run(main)
