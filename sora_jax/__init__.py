"""sora_jax: a JAX/Flax research codebase for Sora-style text-to-video diffusion."""

__version__ = "0.1.0"
