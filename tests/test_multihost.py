"""Multi-host training through jax's own runtime: 2 processes x 4 CPU devices over loopback train
exactly as 1 process x 8 devices, and write one checkpoint together."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import pytest

from sora_jax.data import pipeline
from sora_jax.parallel.mesh import initialize_distributed
from sora_jax.training.checkpoint import restore_for_inference
from sora_jax.training.experiment import get_experiment
from tests.helpers import tiny_config, tiny_data_dir, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3  # step 1 trains at learning rate 0 (warm-up): step 3's loss is the first after an update
# FSDP over all 8 devices: parameters are all-gathered and gradients reduce-scattered across the
# two processes, and each process holds rows 0-3 or 4-7 of every batch.
MESH = dict(data=1, fsdp=8)
OVERRIDES = [f"--config.train.num_steps={STEPS}", "--config.train.log_every=1",
             "--config.sampling.steps=2", *(f"--config.mesh.{k}={v}" for k, v in MESH.items())]
TIMEOUT_S = 600  # a hung collective fails the test instead of blocking it
# The processes reduce gradients and the loss across the process boundary (gloo's ring) in another
# order than one process does, and each encodes 4 captions where one process encodes 8 (other
# matmul blocking): float32 rounding, measured 1.5e-7 relative at most. A batch that differs by
# one clip changes the loss by percents.
LOSS_RTOL = 1e-5


def _config():
    config = tiny_config(**MESH)
    config.train.num_steps = STEPS
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(workdir: str, log: str, devices: int, *flags: str, env: dict | None = None):
    args = [sys.executable, "-m", "sora_jax.train",
            "--config=configs/moving_shapes.py:runlocal,pixels",
            f"--config.data.data_dir={tiny_data_dir()}", f"--workdir={workdir}", *OVERRIDES, *flags]
    inherited = {k: v for k, v in os.environ.items()  # no distributed settings from outside
                 if not k.startswith("SORA_JAX_") and k != "JAX_COORDINATOR_ADDRESS"}
    env = {**inherited, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices), **(env or {})}
    with open(log, "w") as out:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Workdirs of one run on 1 process x 8 devices and one on 2 processes x 4 devices (process 0
    configured by flags, process 1 by environment variables), trained side by side."""
    tmp = tmp_path_factory.mktemp("multihost")
    single, multi = str(tmp / "single"), str(tmp / "multi")
    port = _free_port()
    logs = [str(tmp / f"{name}.log") for name in ("single", "process0", "process1")]
    procs = []
    try:
        procs.append(_train(single, logs[0], 8))
        procs.append(_train(multi, logs[1], 4, f"--coordinator_address=localhost:{port}",
                            "--num_processes=2", "--process_id=0"))
        procs.append(_train(multi, logs[2], 4, env={
            "SORA_JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "SORA_JAX_NUM_PROCESSES": "2",
            "SORA_JAX_PROCESS_ID": "1"}))
        deadline = time.monotonic() + TIMEOUT_S
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = [(log, proc.returncode) for log, proc in zip(logs, procs) if proc.returncode != 0]
    if failed:
        tails = "\n".join(f"--- {log} (exit {code}):\n{open(log).read()[-3000:]}"
                          for log, code in failed)
        pytest.fail(f"Training failed or passed {TIMEOUT_S} s:\n{tails}")
    return single, multi


def _losses(workdir: str) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train_rows = [r for r in rows if "loss" in r]
    steps = [r["step"] for r in train_rows]
    assert steps == sorted(set(steps)), f"steps written more than once: {steps}"
    return {r["step"]: r["loss"] for r in train_rows} | {
        f"val@{r['step']}": r["val/loss"] for r in rows if "val/loss" in r}


def test_two_processes_train_with_the_losses_of_one(runs):
    single, multi = _losses(runs[0]), _losses(runs[1])
    assert list(single) == list(multi) == [1, 2, 3, "val@3"]
    np.testing.assert_allclose([multi[k] for k in single], list(single.values()), rtol=LOSS_RTOL)


def test_two_processes_write_one_checkpoint_that_restores_to_the_single_process_state(runs):
    data = os.path.join(runs[1], "checkpoints", str(STEPS), "data")
    assert sorted(f for f in os.listdir(data) if f.endswith(".json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    exp = get_experiment(_config())
    single, step = restore_for_inference(runs[0], exp.abstract_state())
    multi, multi_step = restore_for_inference(runs[1], exp.abstract_state())
    assert step == multi_step == STEPS and int(multi.step) == STEPS
    # The same rounding as in the losses: measured 1.5e-8 at most, for parameters of size ~1.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
                 jax.device_get(single.groups["dit"].params),
                 jax.device_get(multi.groups["dit"].params))


def test_each_process_resumes_its_own_rows_of_the_next_batch(runs):
    data = os.path.join(runs[1], "checkpoints", str(STEPS), "data")
    kw = dict(**pipeline.data_kwargs(_config().data), split="train", batch_size=8, seed=0)
    one_host = iter(pipeline.make_loader(**kw))
    for _ in range(STEPS):
        next(one_host)
    expected = next(one_host)["caption"]  # the batch a single process trains on next
    for process, rows in enumerate((range(4), range(4, 8))):
        resumed = iter(pipeline.make_loader(**kw, rows=rows))
        with open(os.path.join(data, f"process_{process}-of-2.json")) as f:
            resumed.set_state(f.read().encode())
        assert list(next(resumed)["caption"]) == list(expected[rows.start:rows.stop])


def test_only_process_zero_writes_config_metrics_and_samples(runs):
    workdir = runs[1]
    assert sorted(os.listdir(os.path.join(workdir, "samples"))) == [f"step_{STEPS:06d}.gif"]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["mesh"]["fsdp"] == 8
    assert not [f for f in os.listdir(workdir) if f.endswith(".tmp")]


def test_sigterm_to_one_process_stops_both_at_one_checkpoint(tmp_path):
    """A preemption notice to one process reaches the other through jax's preemption service:
    both save one checkpoint at the same step and exit cleanly."""
    workdir, port = str(tmp_path / "preempted"), _free_port()
    logs = [str(tmp_path / f"process{i}.log") for i in range(2)]
    # One device a process, data parallel: the protocol, not the partitioning, is under test.
    long_run = ["--config.train.num_steps=100000", "--config.train.checkpoint_every=100000",
                "--config.train.eval_every=100000", "--config.train.sample_every=100000",
                "--config.mesh.data=2", "--config.mesh.fsdp=1"]
    procs = [_train(workdir, logs[i], 1, f"--coordinator_address=localhost:{port}",
                    "--num_processes=2", f"--process_id={i}", *long_run) for i in range(2)]
    try:
        deadline = time.monotonic() + TIMEOUT_S
        metrics = os.path.join(workdir, "metrics.jsonl")
        while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 2):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), (
                "training did not start:\n" + "\n".join(open(log).read()[-2000:] for log in logs))
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)  # process 0 is not told
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    tails = "\n".join(f"--- {log}:\n{open(log).read()[-2000:]}" for log in logs)
    assert [p.returncode for p in procs] == [0, 0], tails
    steps = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
    assert len(steps) == 1 and 2 <= steps[0] < 100000, steps
    data = os.path.join(workdir, "checkpoints", str(steps[0]), "data")
    assert sorted(f for f in os.listdir(data) if f.endswith(".json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    for log in logs:
        assert f"saving a checkpoint at step {steps[0]} before exiting" in open(log).read(), tails
    assert max(_losses(workdir)) == steps[0]


# The data pipeline's half of the invariant, without processes.

@pytest.fixture(scope="module")
def loader_kw():
    return dict(name="moving_shapes", builder_config="tiny", data_dir=tiny_data_dir(),
                split="train", batch_size=8, seed=3)


def test_hosts_read_their_rows_of_the_single_host_batches(loader_kw):
    one_host = iter(pipeline.make_loader(**loader_kw))
    hosts = [iter(pipeline.make_loader(**loader_kw, rows=rows))
             for rows in ((0, 1), (2, 3, 4, 5), (6, 7))]
    for _ in range(3):
        expected = next(one_host)
        parts = [next(host) for host in hosts]
        assert [len(p["caption"]) for p in parts] == [2, 4, 2]
        np.testing.assert_array_equal(np.concatenate([p["video"] for p in parts]),
                                      expected["video"])


def test_default_rows_are_the_jax_process_share(loader_kw):
    second_of_two = grain.sharding.ShardOptions(shard_index=1, shard_count=2)
    assert pipeline.host_rows(8, second_of_two) == range(4, 8)
    share = next(iter(pipeline.make_loader(**loader_kw, shard_options=second_of_two)))
    whole = next(iter(pipeline.make_loader(**loader_kw)))
    assert list(share["caption"]) == list(whole["caption"][4:])


def test_finite_loader_drops_or_keeps_the_partial_last_global_batch(loader_kw):
    # 64 validation clips: two global batches of 24, then 16 clips, rows 0-15 of a third.
    kw = loader_kw | dict(split="validation", batch_size=24, shuffle=False, num_epochs=1)
    dropped = list(pipeline.make_loader(**kw, rows=range(8, 24)))
    kept = list(pipeline.make_loader(**kw, rows=range(8, 24), drop_remainder=False))
    one_host = list(pipeline.make_loader(**kw, drop_remainder=False))
    assert [len(b["caption"]) for b in dropped] == [16, 16]
    assert [len(b["caption"]) for b in kept] == [16, 16, 8]
    assert [len(b["caption"]) for b in one_host] == [24, 24, 16]
    assert list(kept[-1]["caption"]) == list(one_host[-1]["caption"][8:])


@pytest.mark.parametrize("kwargs, message", [
    (dict(rows=(3, 1)), "increasing order"),
    (dict(rows=(0, 8)), "distinct rows of a global batch of 8"),
    (dict(rows=(0,), shard_options=grain.sharding.NoSharding()), "not both"),
    (dict(shard_options=grain.sharding.ShardOptions(shard_index=0, shard_count=3)),
     "multiple of 3"),
    (dict(num_epochs=1, worker_count=2), "worker_count=0 or 1"),
])
def test_loader_rejects_rows_it_cannot_serve(loader_kw, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipeline.make_loader(**loader_kw | kwargs)


@pytest.mark.parametrize("num_processes, process_id, message", [
    (0, 0, "num_processes=0"),
    (2, 2, r"process_id=2 is not in \[0, num_processes=2\)"),
])
def test_initialize_distributed_rejects_bad_process_numbers(num_processes, process_id, message):
    with pytest.raises(ValueError, match=message):
        initialize_distributed("localhost:1", num_processes, process_id)
