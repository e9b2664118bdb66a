"""Live migration over a 100 Mbit/s link between two network namespaces (needs root).

    sudo python benchmarks/migration_netns.py [--model smollm2-135m] [--rate-mbit 100] [--blocks 6]
                                              [--queues fifo,relay-first]

Two workers run in their own network namespaces (eh-a, eh-b), joined by a bridge in
the root namespace where this script acts as the head node. Each namespace's side of
its veth is shaped to --rate-mbit, once per queue discipline in --queues:
- ``fifo``: a tbf qdisc, one queue, as a plain router or a board's default qdisc;
- ``relay-first``: htb with two classes, relay frames (to or from the workers' relay port)
  at priority 0, everything else (the pre-copy's pulls) borrowing what they leave, as the
  testbed shapes its links (deploy/testbed/testbed_net.py) and docs/boards.md shows for boards.
Workers pace the pre-copy as PRECOPY_LINK_FRACTION says per queue: at 0.9 of the measured link
behind ``fifo`` (the default, for a board with one queue), not at all behind ``relay-first``, as
docs/boards.md says to configure boards that run deploy/relay-first.sh: the qdisc already
serves relay frames first, and pacing under the measured rate only kept the copy under 0.9 of
the link (0.79-0.81 of it, against 0.90-0.92 unpaced, at the same median slowdown).
The model is spread over both workers; while it decodes, --blocks FFN blocks (and their
layers' attention blocks, with every session's K/V cache) move from worker a to worker b.

It prints, per queue discipline, against baselines from the same run:
- migration throughput: pre-copy bytes / pre-copy time, as a fraction of the link rate, and
  how busy a's link was over the pre-copy (its relay frames included, from tc's counters);
- the decode slowdown: the median and slowest step during the migration against the median
  token time before it, and how long the epoch switch held steps back;
- whether every token matches the in-process engine.
A plot of every step's time, with the pre-copy and the switch marked, goes to
out/migration_netns-QUEUE.png.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgeheads.controller.spread import WorkerCapacity, spread
from edgeheads.headnode.cluster import ClusterExecutor
from edgeheads.headnode.engine import BlockEngine
from edgeheads.headnode.loading import load_model
from edgeheads.headnode.migrate import migrate
from edgeheads.common.spec import BlockKind

BRIDGE, SUBNET = "eh-br0", "10.77.0"
NAMESPACES = {"a": f"{SUBNET}.2", "b": f"{SUBNET}.3"}
RELAY_PORT = 50062
RELAY_FIRST = Path(__file__).resolve().parents[1] / "deploy" / "relay-first.sh"
QUEUES = ("fifo", "relay-first")
PRECOPY_LINK_FRACTION = {"fifo": 0.9, "relay-first": 0.0}  # the workers' worker.precopy_link_fraction


def sh(*args: str, check: bool = True) -> None:
    subprocess.run(args, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def setup_network(rate_mbit: int, queue: str) -> None:
    teardown_network()
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    for name, address in NAMESPACES.items():
        ns, host_end, ns_end = f"eh-{name}", f"eh-{name}-h", f"eh-{name}-n"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        sh("ip", "link", "set", ns_end, "netns", ns)
        sh("ip", "link", "set", host_end, "master", BRIDGE)
        sh("ip", "link", "set", host_end, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{address}/24", "dev", ns_end)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", ns_end, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        shape(ns, ns_end, rate_mbit, queue)


def shape(ns: str, dev: str, rate_mbit: int, queue: str) -> None:
    """Everything leaving ``dev`` goes through a token bucket at the link rate: one FIFO queue,
    or relay frames ahead of everything else, set up as boards set it up (deploy/relay-first.sh)."""
    if queue == "fifo":
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit",
           "burst", "64kb", "latency", "100ms")
    else:
        sh("ip", "netns", "exec", ns, "sh", str(RELAY_FIRST), dev, f"{rate_mbit}mbit", str(RELAY_PORT))


def sent_bytes(name: str) -> int:
    """Bytes the namespace has sent through its veth: what the root-side end received."""
    return int(Path(f"/sys/class/net/eh-{name}-h/statistics/rx_bytes").read_text())


def bytes_between(series: list[tuple[float, int]], start: float, end: float) -> float:
    """Bytes sent from ``start`` to ``end`` (seconds), interpolated in a (time, counter) series."""
    times, counts = zip(*series)
    return float(np.interp(end, times, counts) - np.interp(start, times, counts))


def teardown_network() -> None:
    for name in NAMESPACES:
        sh("ip", "netns", "del", f"eh-{name}", check=False)
        sh("ip", "link", "del", f"eh-{name}-h", check=False)
    sh("ip", "link", "del", BRIDGE, check=False)


def spawn(tmp: Path, name: str, args: list[str], namespace: str | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    log = open(tmp / f"{name}.log", "wb")
    return subprocess.Popen([*prefix, sys.executable, "-m", "edgeheads.headnode.cli", *args, "--ready-file",
                             str(tmp / f"{name}.ready")], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})})


def wait_ready(tmp: Path, name: str, proc: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = tmp / f"{name}.ready"
        if ready.exists() and ready.read_text().strip():
            return ready.read_text().strip()
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited:\n{(tmp / f'{name}.log').read_text()[-2000:]}")
        time.sleep(0.1)
    raise RuntimeError(f"{name} not ready after {timeout} s")


async def decode_with_migration(parts, addresses, placement, moves, prompt_ids, tokens_before, tokens_after):
    executor = ClusterExecutor(parts)
    await executor.apply_placement(1, placement, addresses, progress=True)
    new = {**placement, **{b: "b" for b in moves}}
    steps: list[tuple[float, float]] = []  # (start, seconds) of each decode step
    sent: list[tuple[float, int]] = [(0.0, sent_bytes("a"))]  # (time, bytes a has sent) after each step
    out: list[int] = []
    token = [int(torch.argmax(await executor.step("s", prompt_ids)))]
    out += token
    origin = time.perf_counter()
    task = None
    marks: dict[str, float] = {}
    done_after = None
    while done_after is None or len(out) < done_after + tokens_after:
        if len(out) == tokens_before and task is None:
            marks["start"] = time.perf_counter() - origin
            # weights from the source: this measures the worker-to-worker pull over the shaped link
            task = asyncio.create_task(migrate(executor, 2, new, addresses, timeout_seconds=600, weights_from="source"))
        t0 = time.perf_counter()
        token = [int(torch.argmax(await executor.step("s", token)))]
        steps.append((t0 - origin, time.perf_counter() - t0))
        sent.append((time.perf_counter() - origin, sent_bytes("a")))
        out += token
        if task is not None and task.done() and done_after is None:
            done_after = len(out)
            marks["end"] = time.perf_counter() - origin
    report = task.result()
    await executor.close()
    marks["busy_bytes"] = bytes_between(sent, marks["start"], marks["start"] + report.precopy_seconds)
    return out, steps, marks, report


def run_once(args, parts, prompt_ids, queue: str):
    """One migration under one queue discipline: (tokens, steps, marks, report)."""
    tmp = Path(tempfile.mkdtemp(prefix="edgeheads-netns-"))
    procs: list[subprocess.Popen] = []
    setup_network(args.rate_mbit, queue)
    try:
        controller = spawn(tmp, "controller", ["controller", "--listen", f"{SUBNET}.1:0"])
        procs.append(controller)
        controller_address = wait_ready(tmp, "controller", controller)
        addresses = {}
        for name, ip in NAMESPACES.items():
            proc = spawn(tmp, name, ["worker", "--listen", f"{ip}:50061", "--controller", controller_address,
                                     "--name", name, "--threads", "1", "--relay-port", str(RELAY_PORT)],
                         namespace=f"eh-{name}",
                         env={"EDGEHEADS_WORKER__PRECOPY_LINK_FRACTION": str(PRECOPY_LINK_FRACTION[queue])})
            procs.append(proc)
            addresses[name] = wait_ready(tmp, name, proc)
        placement = spread(parts.shape, [WorkerCapacity(n, 1 << 40) for n in NAMESPACES], 2048)
        ffn_on_a = [b for b, w in sorted(placement.items()) if b.kind is BlockKind.FFN and w == "a"][:args.blocks]
        layers = {b.layer for b in ffn_on_a}
        moves = [b for b, w in placement.items() if w == "a" and b.layer in layers]
        return asyncio.run(decode_with_migration(
            parts, addresses, placement, moves, prompt_ids, args.tokens_before, args.tokens_after))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        teardown_network()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rate-mbit", type=int, default=100)
    ap.add_argument("--blocks", type=int, default=6, help="FFN blocks to move (with their layers' heads)")
    ap.add_argument("--tokens-before", type=int, default=24)
    ap.add_argument("--tokens-after", type=int, default=16)
    ap.add_argument("--queues", default=",".join(QUEUES), help=f"queue disciplines to run, of {', '.join(QUEUES)}")
    args = ap.parse_args()
    queues = args.queues.split(",")
    if not queues or any(q not in QUEUES for q in queues):
        sys.exit(f"--queues takes a comma-separated list of {', '.join(QUEUES)}")
    if os.geteuid() != 0:
        sys.exit("needs root: it creates network namespaces and qdiscs")
    torch.set_num_threads(1)
    model = load_model(args.model, progress=True)
    parts = model.parts
    prompt_ids = model.tokenizer("Migration keeps every token the same because").input_ids
    link = args.rate_mbit * 1e6 / 8
    rows = []
    for queue in queues:
        out, steps, marks, report = run_once(args, parts, prompt_ids, queue)
        engine = BlockEngine(parts)
        ref, token = [], prompt_ids
        for _ in range(len(out)):
            token = [int(torch.argmax(engine.forward("s", token)))]
            ref += token
        before = [s for t, s in steps if t < marks["start"]]
        during = [s for t, s in steps if marks["start"] <= t < marks["end"]]
        token_time = statistics.median(before)
        rate = report.precopy_bytes / report.precopy_seconds
        busy = marks["busy_bytes"] / report.precopy_seconds / link
        print(f"\n[{queue}] model {args.model}; {len(report.moves)} blocks moved a -> b "
              f"({report.weights_skipped} without weights); link {args.rate_mbit} Mbit/s between two network "
              f"namespaces; pre-copy paced at {PRECOPY_LINK_FRACTION[queue]:g} of the measured link (0: unpaced)")
        print(f"pre-copy: {report.precopy_bytes / 1e6:.1f} MB in {report.precopy_seconds:.2f} s = "
              f"{rate * 8 / 1e6:.1f} Mbit/s, {rate / link:.3f} of the link rate (target >= 0.9); a's link was "
              f"{busy:.3f} busy over the pre-copy, relay frames included")
        print(f"switch: {report.delta_bytes} bytes of new cache rows; steps held {report.stall_seconds * 1e3:.1f} ms "
              f"= {report.stall_seconds / token_time:.2f} token times")
        print(f"token time before the migration: median {token_time * 1e3:.1f} ms; during it: median "
              f"{statistics.median(during) * 1e3:.1f} ms ({statistics.median(during) / token_time:.2f}x, target "
              f"<= 1.3x), slowest {max(during) * 1e3:.1f} ms ({max(during) / token_time:.2f}x) over {len(during)} "
              f"steps")
        print(f"tokens identical to the in-process engine: {out == ref} ({len(out)} tokens)")
        plot(steps, marks, report, args.rate_mbit, queue, Path(f"out/migration_netns-{queue}.png"))
        rows.append((queue, rate / link, busy, statistics.median(during) / token_time, out == ref))
    print("\n| queue | pre-copy / link | link busy | median step during / before | tokens identical |")
    print("|---|---|---|---|---|")
    for queue, fraction, busy, slowdown, same in rows:
        print(f"| {queue} | {fraction:.3f} | {busy:.3f} | {slowdown:.2f}x | {same} |")


def plot(steps, marks, report, rate_mbit: int, queue: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot([t for t, _ in steps], [s * 1e3 for _, s in steps], ".-", lw=0.8, label="decode step")
    ax.axvspan(marks["start"], marks["start"] + report.precopy_seconds, color="tab:orange", alpha=0.2,
               label="pre-copy (decoding goes on)")
    ax.axvline(marks["end"], color="tab:red", lw=1, label=f"switch (steps held {report.stall_seconds * 1e3:.0f} ms)")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("step time (ms)")
    ax.set_title(f"Decode step times while blocks migrate over a {rate_mbit} Mbit/s link ({queue} queue)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
