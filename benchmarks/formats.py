"""Decode speed and memory of each weight format: in-process, on a 3-worker cluster, and a peer.

    python benchmarks/formats.py [--model smollm2-135m] [--formats fp32,bf16,fp16,int8,q4]
                                 [--new-tokens 128] [--repeats 3] [--workers 3] [--no-cluster]
                                 [--peer-python /work/peer-venv/bin/python] [--peer-threads 2]
                                 [--kernels int8=int8pack,q4=int4pack] [--out out]

In-process: each format is loaded in a fresh process of its own (this script with --child), so
its peak resident memory (VmHWM) is its own: the table gives the peak, the RSS before the load
(torch, transformers and the rest imported), and how far above that the load itself peaked.
The processes stay up and are asked to generate in rounds (every format once, the peer once,
--repeats rounds), one at a time, so that this machine's drift (other people's jobs) hits all
of them alike; decode tokens/s is each one's median over the rounds, after a 4-token warm-up.

Peer: gpt4all (a llama.cpp runtime), from its own venv (--peer-python; skipped with a message
when absent), in a process of its own driven the same way, on a copy of the model's GGUF whose
``tokenizer.ggml.pre`` is ``refact`` (llama.cpp in gpt4all 2.8.2 does not know ``smollm``; the
same pre-tokenizer rule), written once under --out. Same prompt text, --peer-threads threads,
top_k 1, temperature 0, no repeat penalty; decode tokens/s from the times its token callback
fires (the first token excluded, as here), and the peak RSS of its process.

Cluster: a LocalCluster (controller, --workers workers, head node, each its own process on
loopback) started with --dtype FMT, driven through the Client. Right after each cluster's run,
the in-process fp32 engine and the same format in-process generate once more, and the
cluster's ratios are to those adjacent runs. Bytes per hop: the relay frames the workers took
in (their GetTelemetry counter) and the bytes the kernel received on the workers' relay ports
(tcp_info of each accepted socket, read with ``ss``), both over --new-tokens - 4 decode steps
(a 4-token run is subtracted from the full one, so the prefill and the hellos drop out). A hop
carries a token's activations (hidden size x the compute dtype's bytes, one or two tensors) in
a ValueBatch behind a 16-byte frame header. Workers' memory: the sum of their VmRSS (after the
run) and of their VmHWM, from /proc/PID/status.

Every run uses the same prompt (chat template applied), greedy. In-process runs ignore EOS so
they produce exactly --new-tokens tokens; the cluster stops at EOS, so its tokens are compared
with the in-process tokens of the same format as a prefix (the first difference is shown).
Quantized kernels are pinned (--kernels, EDGEHEADS_KERNELS) in every process: left to
worker/kernel_probe.py a loaded machine could time them apart and processes could disagree.
Every process runs with OMP_WAIT_POLICY=PASSIVE unless the environment sets it, as LocalCluster
sets it for its daemons: on a shared machine, OpenMP threads that spin while waiting for a
descheduled one made the in-process engine 20-30x slower (q4: 1 tok/s against 25). On a quiet
machine passive waits cost the in-process engine about a third (q4: 51 against 74 tok/s);
``OMP_WAIT_POLICY= python benchmarks/formats.py --no-cluster`` (set, but empty) keeps OpenMP's
own default for the in-process figures.

Targets (the issue's): the best format in-process >= 3x our fp32 engine and >= 0.5x the peer's
tokens/s; q4 in-process peak RSS <= 2x the peer's. A bar plot goes to OUT/formats.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF conversion bars

PROMPT = "Write a short story about a robot who learns to paint."
FORMATS = "fp32,bf16,fp16,int8,q4"
DEFAULT_KERNELS = "int8=int8pack,q4=int4pack"  # worker/kernels.py PREFERENCE[0]: the bf16 winners here
REPO = Path(__file__).resolve().parents[1]
DEFAULT_PEER = Path("/work/peer-venv/bin/python")
MIB = 1 << 20
STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:4.0f} s] {message}", file=sys.stderr, flush=True)


def proc_memory(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def serve(ready: dict, generate) -> None:
    """The children's loop: print ``ready``, then answer ``gen N`` (generate N tokens) and
    ``memory`` lines from stdin with one JSON line each, until stdin closes."""
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "gen":
            rate, tokens = generate(int(rest[0]))
            print(json.dumps({"rate": rate, "tokens": tokens}), flush=True)
        elif command == "memory":
            print(json.dumps(proc_memory()), flush=True)


# ---------------------------------------------------------------------- in-process (child)
def child(args: argparse.Namespace) -> None:
    """One format, loaded in this fresh process and then driven by ``serve``."""
    import torch

    from edgeheads.headnode.loading import load_model
    from edgeheads.headnode.local import LocalGenerator, set_threads
    from edgeheads.headnode.sampling import SamplingParams
    from edgeheads.worker import kernels

    set_threads()
    before = proc_memory()
    t0 = time.perf_counter()
    loaded = load_model(args.model, args.child, progress=False)
    load_seconds = time.perf_counter() - t0
    after_load = proc_memory()
    generator = LocalGenerator(loaded, own_weights=True)  # as `edgeheads generate --local` runs
    prompt_ids = generator.encode(PROMPT)

    def generate(new_tokens: int) -> tuple[float, list[int]]:
        result = generator.generate_ids(prompt_ids, SamplingParams(max_new_tokens=new_tokens, stop_on_eos=False))
        return result.decode_tokens_per_second, result.token_ids

    generate(4)  # warm up
    dtype = generator.engine.head.dtype
    text = (loaded.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                                 add_generation_prompt=True) if loaded.has_chat_template else PROMPT)
    serve({"format": args.child, "compute": str(dtype).removeprefix("torch."),
           "kernels": {f: kernels.kernel_for(f, dtype) for f in kernels.PREFERENCE},
           "prompt_tokens": len(prompt_ids), "prompt_text": text, "threads": torch.get_num_threads(),
           "load_seconds": load_seconds, "rss_before_load": before["VmRSS"],
           "peak_after_load": after_load["VmHWM"]}, generate)


PEER_SCRIPT = r"""
import json, sys, time
from importlib.metadata import version
from pathlib import Path

def memory():
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out

cfg = json.loads(sys.argv[1])
import gpt4all
before = memory()
t0 = time.perf_counter()
model = gpt4all.GPT4All(Path(cfg["file"]).name, model_path=str(Path(cfg["file"]).parent), allow_download=False,
                        n_threads=cfg["threads"], device="cpu", verbose=False)
load_seconds = time.perf_counter() - t0
after_load = memory()

def generate(new_tokens):
    times, ids = [], []
    def on_token(token_id, text):
        times.append(time.perf_counter())
        ids.append(token_id)
        return True
    # the low-level call: GPT4All.generate outside a chat session does not parse special tokens
    model.model.prompt_model(cfg["prompt"], "%1", on_token, n_predict=new_tokens, top_k=1, top_p=1.0, min_p=0.0,
                             temp=0.0, n_batch=cfg["n_batch"], repeat_penalty=1.0, repeat_last_n=0,
                             reset_context=True, special=True)
    return (len(ids) - 1) / (times[-1] - times[0]) if len(ids) > 1 else float("nan"), ids

generate(4)  # warm up
print(json.dumps({"format": "peer", "version": version("gpt4all"), "load_seconds": load_seconds,
                  "rss_before_load": before["VmRSS"], "peak_after_load": after_load["VmHWM"]}), flush=True)
for line in sys.stdin:  # as serve() in benchmarks/formats.py
    command, *rest = line.split()
    if command == "gen":
        rate, tokens = generate(int(rest[0]))
        print(json.dumps({"rate": rate, "tokens": tokens}), flush=True)
    elif command == "memory":
        print(json.dumps(memory()), flush=True)
"""


class Runner:
    """A child process answering one JSON line per command (``serve``)."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], cwd: Path) -> None:
        self.name = name
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=cwd)
        self.info = self._read()
        self.runs: list[dict] = []
        self.memory: dict[str, int] = {}  # VmRSS and VmHWM at the end

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name} exited with status {self.proc.wait()}")
            if line.startswith("{"):
                return json.loads(line)
            log(f"{self.name}: {line.rstrip()}")  # a native library writing to stdout

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def generate(self, new_tokens: int, keep: bool = True) -> dict:
        run = self.ask(f"gen {new_tokens}")
        if keep:
            self.runs.append(run)
        return run

    @property
    def rate(self) -> float:
        return statistics.median(r["rate"] for r in self.runs)

    @property
    def deterministic(self) -> bool:
        return all(r["tokens"] == self.runs[0]["tokens"] for r in self.runs)

    @property
    def tokens(self) -> list[int]:
        return self.runs[-1]["tokens"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def peer_gguf(args: argparse.Namespace, out: Path) -> Path:
    """A copy of the model's GGUF with tokenizer.ggml.pre = refact (written once)."""
    from edgeheads.headnode.loading import resolve

    source = resolve(args.model, progress=False)
    if source.kind != "gguf":
        raise SystemExit(f"the peer needs a GGUF model; {args.model} is a {source.kind}")
    original = Path(source.location)
    copy = out / f"{original.stem}.pre-refact.gguf"
    if not copy.exists() or copy.stat().st_mtime < original.stat().st_mtime:
        log(f"peer: writing {copy} (tokenizer.ggml.pre -> refact)")
        partial = copy.with_suffix(".partial")
        done = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(original), str(partial),
                               "--pre-tokenizer", "refact", "--force"], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"gguf_new_metadata failed:\n{done.stderr[-2000:]}")
        partial.rename(copy)
    return copy


def start_peer(args: argparse.Namespace, out: Path, prompt_text: str, env: dict[str, str]) -> Runner | None:
    python = Path(args.peer_python) if args.peer_python else DEFAULT_PEER
    if not python.exists():
        log(f"peer skipped: no {python} (a venv with `pip install gpt4all==2.8.2`; pass --peer-python)")
        return None
    cfg = {"file": str(peer_gguf(args, out)), "threads": args.peer_threads, "prompt": prompt_text,
           "n_batch": args.peer_batch}
    try:
        return Runner("peer", [str(python), "-c", PEER_SCRIPT, json.dumps(cfg)], env, out)
    except RuntimeError as err:
        log(f"peer skipped: {err}")
        return None


# ---------------------------------------------------------------------- cluster
def listening_ports() -> dict[int, set[int]]:
    """pid -> the TCP ports it listens on (``ss -tlnp``); empty without ss."""
    if shutil.which("ss") is None:
        return {}
    out = subprocess.run(["ss", "-tlnpH"], capture_output=True, text=True).stdout
    ports: dict[int, set[int]] = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        port = int(fields[3].rsplit(":", 1)[1])
        for pid in re.findall(r"pid=(\d+)", line):
            ports.setdefault(int(pid), set()).add(port)
    return ports


def relay_ports(cluster, workers: list[str]) -> list[int]:
    """The workers' relay TCP ports: what each listens on besides its gRPC and metrics ports."""
    listening = listening_ports()
    found = []
    for name in workers:
        known = {int(a.rsplit(":", 1)[1]) for a in (cluster.addresses.get(name), cluster.metrics.get(name)) if a}
        found += sorted(listening.get(cluster.procs[name].pid, set()) - known)
    return found


def relay_bytes_received(ports: list[int]) -> int | None:
    """Bytes the kernel has received on the accepted sockets of these local ports (tcp_info's
    bytes_received, by ``ss``); None without ss."""
    if not ports or shutil.which("ss") is None:
        return None
    query = "( " + " or ".join(f"sport = :{p}" for p in ports) + " )"
    out = subprocess.run(["ss", "-tinH", "state", "established", query], capture_output=True, text=True)
    if out.returncode:
        return None
    return sum(int(n) for n in re.findall(r"bytes_received:(\d+)", out.stdout))


def relay_frames(cluster, workers: list[str]) -> int:
    from edgeheads.common.channels import open_sync_channel
    from edgeheads.v1 import worker_pb2, worker_pb2_grpc

    total = 0
    for name in workers:
        with open_sync_channel(cluster.addresses[name]) as channel:
            total += worker_pb2_grpc.WorkerStub(channel).GetTelemetry(
                worker_pb2.TelemetryRequest(), timeout=10).relay_frames_received
    return total


def run_cluster(args: argparse.Namespace, fmt: str, env: dict[str, str]) -> dict:
    from edgeheads.headnode.client import Client
    from edgeheads.headnode.embedded import LocalCluster

    with LocalCluster(args.model, workers=args.workers, progress=False, dtype=fmt, extra_env=env) as cluster, \
            Client(cluster.address) as client:
        workers = [n for n in cluster.procs if n.startswith("worker-")]
        ports = relay_ports(cluster, workers)
        client.generate_full(PROMPT, max_new_tokens=4)  # warm up: connections, caches, kernels

        def measured(new_tokens: int):
            frames, received = relay_frames(cluster, workers), relay_bytes_received(ports)
            gen = client.generate_full(PROMPT, max_new_tokens=new_tokens)
            frames = relay_frames(cluster, workers) - frames
            after = relay_bytes_received(ports)
            return gen, frames, None if received is None or after is None else after - received

        _, short_frames, short_bytes = measured(4)
        gen, frames, received = measured(args.new_tokens)
        status = client.status()
        memory = {n: proc_memory(cluster.procs[n].pid) for n in [*workers, "headnode"]}
    decode_frames = frames - short_frames
    hop_bytes = (received - short_bytes) / decode_frames if received is not None and decode_frames > 0 else None
    n = len(gen.token_ids)
    return {"format": fmt, "tokens": gen.token_ids, "finish": gen.finish_reason,
            "rate": (n - 1) / gen.decode_seconds if n > 1 and gen.decode_seconds > 0 else float("nan"),
            "dataflow": status["dataflow"], "frames_per_token": decode_frames / max(1, args.new_tokens - 4),
            "hop_bytes": hop_bytes, "workers_rss": sum(memory[w]["VmRSS"] for w in workers),
            "workers_peak": sum(memory[w]["VmHWM"] for w in workers), "headnode_peak": memory["headnode"]["VmHWM"]}


# ---------------------------------------------------------------------- report
def plot(path: Path, local: list[Runner], cluster: list[dict], peer: Runner | None, workers: int) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    runners = local + ([peer] if peer else [])
    names = [r.name for r in runners]
    by_fmt = {c["format"]: c for c in cluster}
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.38
    xs = list(range(len(names)))
    left = [x - width / 2 if cluster and x < len(local) else x for x in xs]
    right = [x + width / 2 for x in xs[:len(local)]]
    speed.bar(left, [r.rate for r in runners], width, label="in-process (peer: its own process)")
    if cluster:
        speed.bar(right, [by_fmt[r.name]["rate"] if r.name in by_fmt else 0 for r in local], width,
                  label=f"{workers}-worker cluster, through the Client")
    speed.set_ylabel("decode tokens/s")
    speed.set_title("decode speed (higher is better)")
    memory.bar(left, [r.memory["VmHWM"] / MIB for r in runners], width, label="peak RSS of the process")
    if cluster:
        memory.bar(right, [by_fmt[r.name]["workers_peak"] / MIB if r.name in by_fmt else 0 for r in local], width,
                   label="cluster: the workers' peak RSS, summed")
    memory.set_ylabel("MiB")
    memory.set_title("peak resident memory (lower is better)")
    for ax in (speed, memory):
        ax.set_xticks(xs, names)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.2)  # room for the legend
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def ratio(a: float | None, b: float | None, width: int) -> str:
    """a / b as "1.23x", right-aligned in ``width``; "-" when either is missing."""
    return (f"{a / b:.2f}x" if a is not None and b else "-").rjust(width)


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first index where a and b differ within the shorter one; None when one is a prefix of the other."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def report(args, local: list[Runner], cluster: list[dict], peer: Runner | None) -> None:
    fp32 = next((r for r in local if r.name == "fp32"), None)
    base = fp32.rate if fp32 else None
    peer_rate = peer.rate if peer else None
    peer_peak = peer.memory["VmHWM"] if peer else None
    first = local[0].info
    kernels = ", ".join(f"{f}={k}" for f, k in first["kernels"].items())
    print(f"model {args.model}, prompt {first['prompt_tokens']} tokens (chat template), {args.new_tokens} new "
          f"tokens greedy; in-process: {first['threads']} threads, kernels {kernels}; median of {args.repeats} rounds")
    print("in-process (each format its own fresh process):")
    print(f"  {'format':7s} {'compute':9s} {'tok/s':>7s} {'/ fp32':>7s} {'/ peer':>7s} {'peak MiB':>9s} "
          f"{'imports':>8s} {'load +':>7s} {'end':>6s} {'mem/peer':>8s} {'rounds same':>11s}  every round's tok/s")
    for r in local:
        runs = ", ".join(f"{x['rate']:.1f}" for x in r.runs)
        print(f"  {r.name:7s} {r.info['compute']:9s} {r.rate:7.2f} {ratio(r.rate, base, 7)} "
              f"{ratio(r.rate, peer_rate, 7)} {r.memory['VmHWM'] / MIB:9.0f} {r.info['rss_before_load'] / MIB:8.0f} "
              f"{(r.info['peak_after_load'] - r.info['rss_before_load']) / MIB:7.0f} {r.memory['VmRSS'] / MIB:6.0f} "
              f"{ratio(r.memory['VmHWM'], peer_peak, 8)} {yes(r.deterministic):>11s}  {runs}")
    print("  (peak: VmHWM of the process; imports: RSS before the load; load +: the load's peak over that; "
          "end: RSS after the rounds; rounds same: every round generated the same tokens)")
    if peer:
        runs = ", ".join(f"{x['rate']:.1f}" for x in peer.runs)
        print(f"peer gpt4all {peer.info['version']} (llama.cpp), {args.peer_threads} threads: {peer_rate:.2f} tok/s "
              f"(rounds {runs}), peak {peer_peak / MIB:.0f} MiB (imports {peer.info['rss_before_load'] / MIB:.0f}, "
              f"load + {(peer.info['peak_after_load'] - peer.info['rss_before_load']) / MIB:.0f}, "
              f"end {peer.memory['VmRSS'] / MIB:.0f}), {len(peer.tokens)} tokens, "
              f"rounds same: {yes(peer.deterministic)}")
    else:
        print("peer: skipped")
    if cluster:
        cbase = next((c["rate"] for c in cluster if c["format"] == "fp32"), None)
        print(f"cluster ({args.workers} workers on loopback, dataflow {cluster[0]['dataflow']}); ratios to in-process "
              "runs just after it:")
        print(f"  {'format':7s} {'tok/s':>7s} {'/ fp32 eng':>10s} {'/ same eng':>10s} {'/ cl. fp32':>10s} "
              f"{'/ peer':>7s} {'hops/tok':>8s} {'bytes/hop':>9s} {'workers MiB':>11s} {'peak':>6s}  "
              "tokens = in-process")
        for c in cluster:
            mine = next(r for r in local if r.name == c["format"])
            diff = first_difference(c["tokens"], mine.tokens)
            same = "yes" if diff is None else f"NO, from token {diff}"
            hop = "n/a" if c["hop_bytes"] is None else f"{c['hop_bytes']:.0f}"
            print(f"  {c['format']:7s} {c['rate']:7.2f} {ratio(c['rate'], c['fp32_after'], 10)} "
                  f"{ratio(c['rate'], c['same_after'], 10)} {ratio(c['rate'], cbase, 10)} "
                  f"{ratio(c['rate'], peer_rate, 7)} {c['frames_per_token']:8.1f} {hop:>9s} "
                  f"{c['workers_rss'] / MIB:11.0f} {c['workers_peak'] / MIB:6.0f}  "
                  f"{same} ({len(c['tokens'])} tokens, {c['finish']})")
        print("  (/ fp32 eng, / same eng: to the in-process fp32 and same-format engines run just after; hops/tok: "
              "relay frames into workers per decoded token; bytes/hop: bytes received on the relay ports per frame; "
              "workers MiB: their VmRSS after the run, summed; peak: their VmHWM, summed)")
    best = max(local, key=lambda r: r.rate)
    if base:
        print(f"target: best format in-process >= 3x fp32: {best.name} {best.rate / base:.2f}x "
              f"-> {yes(best.rate / base >= 3)}")
    if peer:
        print(f"target: best format in-process >= 0.5x the peer's tokens/s: {best.name} "
              f"{best.rate / peer_rate:.2f}x -> {yes(best.rate / peer_rate >= 0.5)}")
        q4 = next((r for r in local if r.name.partition(":")[0] == "q4"), None)
        if q4:
            share = q4.memory["VmHWM"] / peer_peak
            print(f"target: q4 in-process peak RSS <= 2x the peer's: {q4.memory['VmHWM'] / MIB:.0f} / "
                  f"{peer_peak / MIB:.0f} MiB = {share:.2f}x -> {yes(share <= 2)}")
            diff = first_difference(q4.tokens, peer.tokens)
            print(f"peer's greedy tokens equal in-process {q4.name}'s for the first "
                  f"{min(len(q4.tokens), len(peer.tokens)) if diff is None else diff} of {len(peer.tokens)} "
                  "(its q4 dot products quantize the activations too; informational)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--formats", default=FORMATS, help="--dtype values (fp32 is the baseline of the ratios)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of generations in-process and in the peer")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--no-cluster", action="store_true", help="in-process and peer only")
    ap.add_argument("--peer-python", help=f"the python of a venv with gpt4all 2.8.2 (default {DEFAULT_PEER} if "
                                          "present, else the peer is skipped)")
    ap.add_argument("--peer-threads", type=int, default=2)
    ap.add_argument("--peer-batch", type=int, default=8, help="the peer's prompt batch (gpt4all's n_batch)")
    ap.add_argument("--kernels", default=DEFAULT_KERNELS,
                    help="EDGEHEADS_KERNELS for every process; '' leaves the choice to the probe")
    ap.add_argument("--out", default=str(REPO / "out"), help="where formats.png and the peer's GGUF copy go")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: one format in-process
    args = ap.parse_args()
    if args.kernels:
        os.environ["EDGEHEADS_KERNELS"] = args.kernels
    if args.child:
        child(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # as LocalCluster sets for its daemons: on a shared machine, spinning OpenMP threads wait for
    # descheduled ones (measured here under load: q4 1 tok/s spinning, 25 passive)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env = {**os.environ}
    formats = args.formats.split(",")
    started = time.perf_counter()

    local: list[Runner] = []
    peer: Runner | None = None
    try:
        for fmt in formats:  # one at a time: each load's peak stays its own, and the machine is small
            log(f"in-process {fmt}: loading")
            local.append(Runner(fmt, [sys.executable, __file__, "--child", fmt, "--model", args.model], env, REPO))
        log("peer: loading")
        peer = start_peer(args, out, local[0].info["prompt_text"], env)
        runners = local + ([peer] if peer else [])
        for round_ in range(args.repeats):
            for r in runners:
                rate = r.generate(args.new_tokens)["rate"]
                log(f"round {round_ + 1}: {r.name} {rate:.2f} tok/s")

        cluster = []
        if not args.no_cluster:
            extra = {"EDGEHEADS_KERNELS": args.kernels} if args.kernels else {}
            fp32 = next((r for r in local if r.name == "fp32"), None)
            for mine in local:
                log(f"cluster {mine.name}")
                run = run_cluster(args, mine.name, extra)
                run["same_after"] = mine.generate(args.new_tokens, keep=False)["rate"]
                run["fp32_after"] = (run["same_after"] if mine is fp32 else
                                     fp32.generate(args.new_tokens, keep=False)["rate"] if fp32 else None)
                cluster.append(run)
                log(f"  {run['rate']:.2f} tok/s (in-process just after: {run['same_after']:.2f})")
        for r in runners:
            r.memory = r.ask("memory")
    finally:
        for r in local + ([peer] if peer else []):
            r.close()

    report(args, local, cluster, peer)
    problem = plot(out / "formats.png", local, cluster, peer, args.workers)
    print(problem or f"plot: {out / 'formats.png'}")
    log(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
