"""Per-operation time of a jitted step on CPU, from a `jax.profiler` trace (`profile_step.py`,
`compare_pytorch.py --profile`).

XLA's CPU runtime records one trace event per operation it runs, named as the instruction in the
compiled program. `profile` traces a few steps, matches the events to the program's text, shares
each interval among the operations running in it (so the parts add up to the traced wall time), and
counts the FLOPs of the matmuls (`dot`s) each operation is or calls.
"""

import collections
import glob
import gzip
import json
import math
import os
import re
import tempfile

from benchmarks import common

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* (\w[\w-]*)\((.*)$", re.M)
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", re.M)


def hlo_operations(text: str) -> dict[str, dict]:
    """For each instruction of a compiled module's text: its op_name, the FLOPs of the dots it is or
    calls (one level of fusion), and whether those dots have batch dimensions."""
    shapes, lines = {}, {}
    for m in _INSTRUCTION.finditer(text):
        name, _, dims, opcode, rest = m.groups()
        shapes[name] = [int(d) for d in dims.split(",") if d]
        lines[name] = (opcode, rest)
    bodies, starts = {}, [(m.group(1), m.end()) for m in _COMPUTATION.finditer(text)]
    for (name, start), (_, end) in zip(starts, starts[1:] + [(None, len(text))]):
        bodies[name] = text[start:end]

    def dots(opcode, rest, name):
        if opcode != "dot":
            return []
        lhs = re.match(r"%([\w.\-]+)", rest).group(1)
        contracted = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1)
        k = math.prod(shapes[lhs][int(d)] for d in contracted.split(",") if d)
        batched = "lhs_batch_dims" in rest
        return [(2 * math.prod(shapes[name]) * k, batched)]

    ops = {}
    for name, (opcode, rest) in lines.items():
        found = dots(opcode, rest, name)
        called = _CALLS.search(rest)
        if called and called.group(1) in bodies:
            for m in _INSTRUCTION.finditer(bodies[called.group(1)]):
                found += dots(m.group(4), m.group(5), m.group(1))
        op_name = re.search(r'op_name="([^"]*)"', rest)
        ops[name] = {"op": op_name.group(1) if op_name else opcode, "flops": sum(f for f, _ in found),
                     "batched": any(b for _, b in found)}
    return ops


def shared_times(events: list[tuple[float, float, str]]) -> dict[str, float]:
    """Microseconds per operation name, each interval shared equally among the events running in it."""
    points = sorted([(s, 1, i) for i, (s, _, _) in enumerate(events)]
                    + [(e, -1, i) for i, (_, e, _) in enumerate(events)])
    active, last, share = set(), None, collections.defaultdict(float)
    for t, kind, i in points:
        for j in active:
            share[events[j][2]] += (t - last) / len(active)
        last = t
        (active.add if kind > 0 else active.discard)(i)
    return share


def _group(op: str) -> str:
    """'jit(train_step)/transpose(jvp(DiT))/.../blocks/mlp/fc1/dot_general' -> 'backward DiT/.../fc1/dot_general'."""
    op = re.sub(r"^jit\([^)]*\)/", "", op).replace("/closed_call", "")
    for prefix, direction in ((r"^transpose\(jvp\(([^)]*)\)\)", "backward"), (r"^jvp\(([^)]*)\)", "forward")):
        if re.match(prefix, op):
            return f"{direction} " + re.sub(prefix, r"\1", op)
    return op


def profile(step, args, *, steps: int = 2, top: int = 25, trace_dir: str | None = None) -> dict:
    """Traces `steps` calls of the jitted `step(*args)`, which returns (new first argument, outputs),
    and breaks their time down: dense matmuls, batched (attention) matmuls and everything else, and
    the `top` groups of operations by time. Call it after warm-up, under the step's mesh; a donated
    first argument is consumed."""
    import jax

    if steps < 1:
        raise ValueError(f"steps={steps}: trace at least one step.")
    trace_dir = trace_dir or tempfile.mkdtemp(prefix="profile_step_")
    # The jitted step's own executable (lowering hits its cache): the text names what the trace ran.
    text = step.lower(*args).compile().as_text()
    common.log(f"tracing {steps} steps into {trace_dir}")
    first, rest = args[0], args[1:]
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(steps):
        first, out = step(first, *rest)
        jax.block_until_ready(out)
    jax.profiler.stop_trace()

    ops = hlo_operations(text)
    trace = max(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "perfetto_trace.json.gz")))
    events = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in json.load(gzip.open(trace))["traceEvents"]
              if e.get("ph") == "X" and e.get("name") in ops]
    if not events:
        raise SystemExit(f"The trace in {trace_dir} has no per-operation events: XLA records them on "
                         "CPU only. Open the trace in Perfetto or TensorBoard instead.")
    us = shared_times(events)
    wall_ms = sum(us.values()) / steps / 1e3

    parts = {k: [0.0, 0] for k in ("matmuls", "batched_matmuls", "other")}
    groups = collections.defaultdict(lambda: [0.0, 0, 0])
    for name, t in us.items():  # each operation runs once a step
        op = ops[name]
        part = "other" if not op["flops"] else "batched_matmuls" if op["batched"] else "matmuls"
        group = groups[_group(op["op"])]
        for totals in (parts[part], group):
            totals[0] += t / steps
            totals[1] += op["flops"]
        group[2] += 1

    def row(t_us, flops):
        ms = t_us / 1e3
        return {"ms_per_step": round(ms, 1), "share": round(ms / wall_ms, 3), "gflop": round(flops / 1e9, 2),
                "gflop_per_s": round(flops / ms / 1e6, 1) if flops else None}

    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return {"traced_steps": steps, "wall_ms_per_step": round(wall_ms, 1),
            "parts": {k: row(t, f) for k, (t, f) in parts.items()},
            "top": [{"op": k, "operations": n, **row(t, f)} for k, (t, f, n) in ranked],
            "trace": trace}
