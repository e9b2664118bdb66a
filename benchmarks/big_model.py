"""A model larger than any one worker: a random 1.1B-parameter llama in Q4_0 on 3 workers whose
memory limits are each well below the model's size.

    python benchmarks/big_model.py [--limit-fraction 0.45 | --limit-mb N] [--new-tokens 16]
                                   [--layers 20] [--hidden 2048] [--path FILE] [--no-refusal]

1. Writes the model (benchmarks/random_gguf.py: random Q4_0 blocks, no float weights; cached
   under ~/.cache/edgeheads/random/, so reruns skip this).
2. Loads it in this process as q4 (``load_model(path, "q4")``: the tensors as stored) and
   generates greedily from a fixed prompt (after a 2-token warm-up that lets the int4 kernel
   repack its weights).
3. Starts a loopback cluster (controller, head node, 3 workers) with ``--memory-limit L`` on
   each worker, L = 0.45 x the file's size by default, and generates the same.
4. Starts it again with limits that together cannot hold the layers' weights, and checks that
   the cluster refuses with an error that says so.

Printed: the model's size, L, the placement's own figures, and per worker its peak and final
resident memory (VmHWM / VmRSS), the same less an idle worker's resident size (the Python,
torch and gRPC runtime a worker has before it holds any block), the bytes it accounts (block
weights + caches: what its limit bounds; the highest seen while generating) against L; tokens/s
in-process and on the cluster; and whether the tokens are identical. Exit status 1 when the
tokens differ, a worker accounts more than its limit, or the refusal is missing.

Resident memory is not what the limit bounds: a worker's limit counts its weights and caches,
and the process also holds its runtime and whatever a kernel derives from the weights (the
table says how far RSS less the idle baseline is from the accounted bytes). The in-process
run sets OMP_WAIT_POLICY=PASSIVE, as LocalCluster does for its daemons.

Measured here (2 shared cores, 1.103B parameters, 594 MiB file, L = 267 MiB = 0.45 x file):
tokens identical; accounted peak 189 / 187 / 164 MiB (<= L); RSS end 733-806 MiB with an
idle worker at 263 MiB, so 450-543 MiB beyond the runtime, of which ~190 MiB is the int4
kernel's repacked copy of the weights (worker/kernels.py ``prepared``, not accounted);
decode 11.9 tokens/s in-process, 10.4 on the cluster. At L = 212.6 MiB (0.36 x the file,
the least the placement accepts) it runs the same; 3 x 161.5 MiB is refused.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc  # noqa: E402

from random_gguf import RandomLlama, write_random_gguf  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
PLANNING_CONTEXT_TOKENS = 2048  # controller/membership.py ClusterState: the context each block is planned with
MiB = 1 << 20


# ---------------------------------------------------------------------- measurements
def proc_status_bytes(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` size field (VmHWM, VmRSS) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(f"{key} not in /proc/{pid}/status")


def block_weight_bytes(weights: dict) -> int:
    """A block's weight bytes as a worker accounts them (worker/blocks/base.py Block.weight_bytes)."""
    return sum(t.numel() * t.element_size() for n, t in weights.items() if not n.startswith("rope."))


def planning_context(shape) -> int:
    return min(PLANNING_CONTEXT_TOKENS, shape.max_positions)


def planned_bytes(shape, names: list[str], capacity: int) -> dict[str, int] | None:
    """What the default placement (spread) puts on each of ``names`` when each has ``capacity``
    bytes (weights + a cache of the planning context, by the model's averaged bytes per
    parameter), or None when it finds no placement."""
    from edgeheads.common.spec import block_memory_bytes
    from edgeheads.controller.spread import InfeasiblePlacement, WorkerCapacity, spread

    context = planning_context(shape)
    try:
        placement = spread(shape, [WorkerCapacity(n, capacity) for n in names], context)
    except InfeasiblePlacement:
        return None
    need = {n: 0 for n in names}
    for block, worker in placement.items():
        need[worker] += block_memory_bytes(shape, block.kind, context)
    return need


def smallest_feasible_limit(shape, n_workers: int) -> int:
    """The smallest equal per-worker memory the default placement accepts (bisection)."""
    names = [f"worker-{i}" for i in range(n_workers)]
    high = sum(planned_bytes(shape, names[:1], 1 << 62).values())
    low = 0  # infeasible
    while high - low > 1:
        mid = (low + high) // 2
        if planned_bytes(shape, names, mid) is None:
            low = mid
        else:
            high = mid
    return high


def telemetry(address: str):
    from edgeheads.v1 import worker_pb2, worker_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        return worker_pb2_grpc.WorkerStub(channel).GetTelemetry(worker_pb2.TelemetryRequest(), timeout=10)


class UsedSampler:
    """Polls every worker's accounted memory (memory_used_bytes) while running; keeps the peak."""

    def __init__(self, addresses: dict[str, str], period_seconds: float = 0.05) -> None:
        from edgeheads.v1 import worker_pb2_grpc

        self.channels = {w: grpc.insecure_channel(a) for w, a in addresses.items()}
        self.stubs = {w: worker_pb2_grpc.WorkerStub(c) for w, c in self.channels.items()}
        self.peak = {w: 0 for w in addresses}
        self.period = period_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        from edgeheads.v1 import worker_pb2

        for w, stub in self.stubs.items():
            used = stub.GetTelemetry(worker_pb2.TelemetryRequest(), timeout=10).memory_used_bytes
            self.peak[w] = max(self.peak[w], used)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def __enter__(self) -> "UsedSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        for channel in self.channels.values():
            channel.close()


def idle_worker_rss() -> int:
    """Resident bytes of a worker that holds no block: registered with a controller, telemetry
    running, a moment after it came up (the runtime every worker carries)."""
    from edgeheads.headnode.embedded import LocalCluster

    with LocalCluster(workers=1, progress=False, with_headnode=False) as cluster:
        time.sleep(3)
        telemetry(cluster.addresses["worker-0"])
        return proc_status_bytes(cluster.procs["worker-0"].pid, "VmRSS")


# ---------------------------------------------------------------------- runs
@dataclass
class InProcess:
    tokens: list[int]
    text: str
    decode_tokens_per_second: float
    prefill_seconds: float
    load_seconds: float
    shape: object
    layer_weight_bytes: int  # every block's weights, as workers account them
    head_weight_bytes: int
    peak_rss: int


def run_in_process(path: Path, prompt: str, new_tokens: int, progress: bool = True) -> InProcess:
    from edgeheads.headnode.loading import load_model
    from edgeheads.headnode.local import LocalGenerator
    from edgeheads.headnode.sampling import SamplingParams

    start = time.perf_counter()
    model = load_model(str(path), "q4", progress=progress)
    loaded = time.perf_counter() - start
    generator = LocalGenerator(model)
    generator.generate(prompt, SamplingParams(max_new_tokens=2))  # the int4 kernel repacks each weight once
    result = generator.generate(prompt, SamplingParams(max_new_tokens=new_tokens))
    out = InProcess(result.token_ids, result.text, result.decode_tokens_per_second, result.prefill_seconds, loaded,
                    model.parts.shape, sum(block_weight_bytes(w) for w in model.parts.blocks.values()),
                    block_weight_bytes(model.parts.head), proc_status_bytes(os.getpid(), "VmHWM"))
    del generator, model, result
    gc.collect()
    return out


@dataclass
class WorkerFigures:
    name: str
    limit: int  # as the worker reports it
    limit_source: str
    blocks: int
    used_peak: int  # accounted bytes: the highest seen while generating
    used_end: int
    rss_peak: int  # VmHWM
    rss_end: int  # VmRSS


@dataclass
class ClusterRun:
    tokens: list[int]
    decode_tokens_per_second: float
    prefill_seconds: float
    start_seconds: float
    workers: list[WorkerFigures] = field(default_factory=list)
    headnode_rss_peak: int = 0


def run_cluster(path: Path, prompt: str, new_tokens: int, limit: int, n_workers: int = 3,
                progress: bool = True) -> ClusterRun:
    from edgeheads.headnode import Client
    from edgeheads.headnode.embedded import LocalCluster

    env = {"EDGEHEADS_CONTROLLER__REPLAN_EVERY_TOKENS": "0"}  # the placement stays as measured
    start = time.perf_counter()
    with LocalCluster(str(path), workers=n_workers, progress=progress, worker_memory_limit_bytes=limit,
                      dtype="q4", extra_env=env) as cluster, Client(cluster.address, timeout_seconds=900) as client:
        started = time.perf_counter() - start
        names = sorted(n for n in cluster.procs if n.startswith("worker-"))
        client.generate_full(prompt, max_new_tokens=2)  # warm-up, as in-process
        with UsedSampler({n: cluster.addresses[n] for n in names}) as sampler:
            result = client.generate_full(prompt, max_new_tokens=new_tokens)
        placement = client.status()["placement"]
        n = len(result.token_ids) - 1
        run = ClusterRun(result.token_ids, n / result.decode_seconds if n > 0 and result.decode_seconds else 0.0,
                         result.prefill_seconds, started,
                         headnode_rss_peak=proc_status_bytes(cluster.procs["headnode"].pid, "VmHWM"))
        for name in names:
            t = telemetry(cluster.addresses[name])
            pid = cluster.procs[name].pid
            run.workers.append(WorkerFigures(
                name, t.memory_limit_bytes, t.memory_limit_source, sum(1 for w in placement.values() if w == name),
                max(sampler.peak[name], t.memory_used_bytes), t.memory_used_bytes,
                proc_status_bytes(pid, "VmHWM"), proc_status_bytes(pid, "VmRSS")))
    return run


def refusal(path: Path, limit: int, n_workers: int = 3) -> tuple[str, dict[str, str]]:
    """Start a cluster whose workers have ``limit`` bytes each: the error it fails to start with
    ("" if it started) and the logs of the controller and the workers."""
    from edgeheads.headnode.embedded import LaunchError, LocalCluster

    cluster = LocalCluster(str(path), workers=n_workers, progress=False, worker_memory_limit_bytes=limit, dtype="q4")
    names = ["controller", *(f"worker-{i}" for i in range(n_workers))]
    try:
        cluster.start()
    except LaunchError as err:
        return str(err), {n: cluster.log_tail(n, 1000) for n in names}
    cluster.stop()
    return "", {}


# ---------------------------------------------------------------------- report
def mb(n: float) -> str:
    return f"{n / MiB:8.1f} MiB"


def main() -> int:
    # before torch loads (nothing above imports it): OpenMP threads sleep between ops instead of
    # spinning, as LocalCluster sets for its daemons; spinning made in-process decoding 5x slower
    # on a shared 2-core machine
    assert "torch" not in sys.modules, "OMP_WAIT_POLICY must be set before torch is imported"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--path", type=Path, help="where to write the GGUF (default: the cache)")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--limit-fraction", type=float, default=0.45, help="each worker's limit / the file's size")
    parser.add_argument("--limit-mb", type=float, help="each worker's limit in MiB (instead of --limit-fraction)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--threads", type=int, help="torch threads in-process (default: torch's, one per core)")
    parser.add_argument("--no-refusal", action="store_true", help="skip the too-small-limits check")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    spec = RandomLlama(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                       intermediate=args.intermediate, seed=args.seed)
    start = time.perf_counter()
    path = write_random_gguf(spec, args.path)
    size = path.stat().st_size
    print(f"model: {path} ({size / 1e6:.0f} MB, {mb(size).strip()}), ready in {time.perf_counter() - start:.1f} s",
          flush=True)

    local = run_in_process(path, args.prompt, args.new_tokens)
    shape = local.shape
    params = spec.params(shape.vocab_size)
    need = smallest_feasible_limit(shape, args.workers)
    limit = int(args.limit_mb * MiB) if args.limit_mb else int(args.limit_fraction * size)
    print(f"in-process: loaded in {local.load_seconds:.1f} s, {len(local.tokens)} tokens, "
          f"{local.decode_tokens_per_second:.2f} tokens/s, peak RSS {mb(local.peak_rss).strip()}", flush=True)
    baseline = idle_worker_rss()
    print(f"idle worker RSS (runtime, no blocks): {mb(baseline).strip()}", flush=True)
    cluster = run_cluster(path, args.prompt, args.new_tokens, limit, args.workers)

    refused = ""
    refusal_limit = int(local.layer_weight_bytes / args.workers * 0.9)
    if not args.no_refusal:
        refused, _ = refusal(path, refusal_limit, args.workers)

    same = cluster.tokens == local.tokens
    over = [w.name for w in cluster.workers if w.used_peak > w.limit]
    print()
    print(f"model           {params / 1e9:.3f}B parameters ({shape.n_layers} layers, hidden {shape.hidden_size}, "
          f"{shape.n_heads} heads / {shape.n_kv_heads} KV, ffn {shape.intermediate_size}, vocab {shape.vocab_size})")
    print(f"file (Q4_0)     {mb(size)}")
    print(f"loaded (q4)     {mb(local.layer_weight_bytes + local.head_weight_bytes)}  = layers "
          f"{mb(local.layer_weight_bytes).strip()} (on workers) + head {mb(local.head_weight_bytes).strip()} "
          "(embedding, output: on the head node)")
    print(f"limit L         {mb(limit)}  per worker = {limit / size:.2f} x the file; {args.workers} x L = "
          f"{mb(args.workers * limit).strip()}")
    print(f"placement needs {mb(need)}  per worker at least (spread policy, weights + a "
          f"{planning_context(shape)}-token cache per block, the model's mean bytes per parameter)")
    print()
    print(f"{'worker':<9} {'limit':>12} {'blocks':>6} {'accounted peak':>15} {'accounted end':>14} "
          f"{'RSS peak':>13} {'RSS end':>13} {'RSS peak - idle':>16} {'RSS end - idle':>15}")
    for w in cluster.workers:
        print(f"{w.name:<9} {mb(w.limit)} {w.blocks:>6} {mb(w.used_peak):>15} {mb(w.used_end):>14} "
              f"{mb(w.rss_peak):>13} {mb(w.rss_end):>13} {mb(w.rss_peak - baseline):>16} "
              f"{mb(w.rss_end - baseline):>15}  ({w.limit_source})")
    print(f"idle worker RSS {mb(baseline)}   head node peak RSS {mb(cluster.headnode_rss_peak)}  "
          f"(it loads the whole model before shipping blocks)")
    print()
    print(f"tokens/s        in-process {local.decode_tokens_per_second:.2f}   cluster "
          f"{cluster.decode_tokens_per_second:.2f}   (decode, after a warm-up; prefill "
          f"{local.prefill_seconds:.2f} s vs {cluster.prefill_seconds:.2f} s; cluster up in "
          f"{cluster.start_seconds:.0f} s)")
    print(f"tokens          {'identical' if same else 'DIFFERENT'}: {len(local.tokens)} tokens {local.tokens}")
    if not same:
        print(f"                cluster: {cluster.tokens}")
    print(f"text            {local.text!r}")
    print(f"accounted <= L  {'yes, every worker' if not over else 'NO: ' + ', '.join(over)}")
    rss_over = [w.name for w in cluster.workers if w.rss_end - baseline > w.limit]
    extra = ", ".join(f"{w.name} {(w.rss_end - baseline - w.used_end) / MiB:.0f}" for w in cluster.workers)
    print(f"not accounted   RSS end - idle - accounted end, MiB: {extra}: the int4 kernel's repacked copy of each "
          "q4 weight (worker/kernels.py prepared(): as large as the weights, outside memory_used) and allocator "
          "slack; RSS peak adds the repacking's int32 transient")
    if rss_over:
        print(f"RSS - idle > L  {', '.join(rss_over)}: resident memory beyond the runtime exceeds the limit")
    if not args.no_refusal:
        reason = next((line.strip() for line in reversed(refused.splitlines()) if line.strip()), "")
        print(f"refusal         {args.workers} x {mb(refusal_limit).strip()} (< the layers' "
              f"{mb(local.layer_weight_bytes).strip()}): {'refused: ' + reason if refused else 'NOT REFUSED'}")
    return 0 if same and not over and (refused or args.no_refusal) else 1


if __name__ == "__main__":
    sys.exit(main())
