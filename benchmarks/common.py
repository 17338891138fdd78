"""Pieces the benchmark scripts share: the allocator, random batches, interleaved timing, the peak.

Import this before jax: `use_fast_allocator` may restart the process with another allocator.
"""

import functools
import os
import resource
import sys
import time
from collections.abc import Callable

# A CPU train step frees and reallocates gigabytes every step; an allocator that hands those pages
# back to the kernel makes the next step fault them in again (seconds a step at DiT-S size). As the
# Makefile: jemalloc (Debian's libjemalloc2) where installed, here told to keep freed pages. Without
# it, glibc with one arena (XLA allocates from its worker threads, and glibc's other arenas map
# large blocks afresh), no mmap for large blocks and no trimming keeps them too. (The Makefile's
# fallback, glibc's huge pages, still maps afresh, and each huge page fault may compact memory.)
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2")
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
GLIBC_KEEP_PAGES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                    "glibc.malloc.trim_threshold=68719476736")


def use_fast_allocator() -> None:
    """Restarts this process under an allocator that keeps freed pages, unless one was chosen.

    Set LD_PRELOAD or GLIBC_TUNABLES yourself (even to an empty string) to keep your choice.
    """
    if "LD_PRELOAD" in os.environ or "GLIBC_TUNABLES" in os.environ:
        return
    env = dict(os.environ)
    jemalloc = [p for p in JEMALLOC_PATHS if os.path.exists(p)]
    if jemalloc:
        env["LD_PRELOAD"] = jemalloc[0]
        env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    else:
        env["GLIBC_TUNABLES"] = GLIBC_KEEP_PAGES
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def allocator() -> str:
    """The allocator this process runs with, as `use_fast_allocator` or the caller chose it."""
    if os.environ.get("LD_PRELOAD"):
        conf = os.environ.get("MALLOC_CONF")
        return f"LD_PRELOAD={os.environ['LD_PRELOAD']}" + (f" MALLOC_CONF={conf}" if conf else "")
    if os.environ.get("GLIBC_TUNABLES"):
        return f"GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}"
    return "glibc malloc"


def limit_cpus(count: int | None) -> int:
    """Restricts this process to its first `count` allowed CPUs (None: keeps them all); returns how
    many it may use. Call it before jax's CPU backend starts, which sizes its thread pool by them."""
    cpus = sorted(os.sched_getaffinity(0))
    if count is not None:
        if not 1 <= count <= len(cpus):
            raise ValueError(f"cannot run on {count} CPUs: this process may use {len(cpus)}; pass "
                             f"a count from 1 to {len(cpus)}")
        os.sched_setaffinity(0, cpus[:count])
    return len(os.sched_getaffinity(0))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def random_batch(exp, key):
    """A training batch of the experiment's grid shapes: uniform latents in [-1, 1], normal text
    tokens, every caption token real; placed with the experiment's batch shardings."""
    import jax
    import jax.numpy as jnp

    shapes = exp.batch_shapes()
    keys = jax.random.split(key, 2)
    batch = {
        "latent": jax.random.uniform(keys[0], shapes["latent"].shape, minval=-1, maxval=1),
        "text": jax.random.normal(keys[1], shapes["text"].shape),
        "text_mask": jnp.ones(shapes["text_mask"].shape, bool),
    }
    return jax.device_put(batch, exp.batch_shardings(batch))


def peak_definition(dtype) -> str:
    """What `metrics.peak_flops_per_device` measured for a model of this compute dtype."""
    import jax
    import jax.numpy as jnp

    if jax.devices()[0].platform != "cpu":
        return "published bf16 peak"
    return ("matmul peak measured in this process ("
            + ("bf16 x bf16 -> f32" if dtype == jnp.bfloat16 else "f32") + ")")


def matmul_peak(dtype, size: int = 1024, seconds: float = 1.0) -> tuple[float, float]:
    """Matmul throughput of this process on all its threads, as `metrics.measure_matmul_peak`
    defines it (bf16 operands accumulate in f32): (FLOP/s of wall time, FLOP/s of CPU time)."""
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype)
    _matmul()(a, a).block_until_ready()
    n, wall, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds or n < 3:
        _matmul()(a, a).block_until_ready()
        n += 1
    flops = 2 * size**3 * n
    return flops / (time.perf_counter() - wall), flops / (time.process_time() - cpu)


@functools.cache
def _matmul():
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))


def interleaved(runs: dict[str, Callable[[], float]], rounds: int, *, warmup: int = 1,
                on_round: Callable[[int, dict[str, list[float]]], None] | None = None
                ) -> dict[str, list[float]]:
    """Calls every run once per round, in turn (A B C A B C ...), so that a busy machine slows
    them alike. Each run returns its own measurement (e.g. seconds of one step). The first `warmup`
    rounds are not kept. Returns each run's kept measurements."""
    kept = {name: [] for name in runs}
    for i in range(warmup + rounds):
        for name, run in runs.items():
            value = run()
            if i >= warmup:
                kept[name].append(value)
        if i >= warmup and on_round is not None:
            on_round(i - warmup, kept)
    return kept


def timed(fn: Callable[[], object]) -> Callable[[], tuple[float, float, float, int]]:
    """A run for `interleaved`: fn(), which must block until its work is done, measured as (wall
    seconds, CPU seconds, of which in the kernel, minor page faults). CPU time counts every thread of
    this process: on a shared machine it is what the run cost, whatever share of the CPUs it got;
    kernel time and page faults show what the allocator costs."""
    def run():
        wall, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        fn()
        after = resource.getrusage(resource.RUSAGE_SELF)
        sys_s = after.ru_stime - before.ru_stime
        return (time.perf_counter() - wall, after.ru_utime - before.ru_utime + sys_s, sys_s,
                after.ru_minflt - before.ru_minflt)
    return run
