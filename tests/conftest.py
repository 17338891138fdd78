"""Test set-up: 8 emulated CPU devices, set before jax is first imported."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's programs are tiny and compiled once or twice each: LLVM's optimisation passes cost
# more than they save (a runlocal training test took 1.7x longer with them). Numerics are XLA's
# either way; benchmarks/ and real runs keep the default.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Entry-point tests start subprocesses; a shared compilation cache spares them recompiling.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..",
                                                                ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

# The files that take longest (`--durations`), run first: `make test` hands whole files to its two
# workers in collection order, so the short files fill in at the end instead of one long file
# running alone on one worker while the other idles.
LONGEST_FIRST = ("test_multihost.py", "test_configs.py", "test_notebooks.py", "test_vae_training.py",
                 "test_training.py", "test_entry_points.py", "test_prompting.py",
                 "test_vae_sharding.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)  # stable: each file keeps its own order
