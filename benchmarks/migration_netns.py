"""Live migration over a 100 Mbit/s link between two network namespaces (needs root).

    sudo python benchmarks/migration_netns.py [--model smollm2-135m] [--rate-mbit 100] [--blocks 6]
                                              [--queues fifo,relay-first] [--repeat 1]

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
- migration throughput: pre-copy bytes / pre-copy time, as a fraction of the link rate and of
  what one TCP flow alone carries over the same shaped link (measured just before the workers
  start: TCP/IP headers take 4.4% of a 1500-byte frame, so a lone flow's payload reaches about
  0.956 of the rate); and, from tc's own byte counters over the pre-copy, the share of a's link
  its relay frames took and the share left idle;
- the decode slowdown: the median and slowest step during the migration against the median
  token time before it, and how long the epoch switch held steps back;
- what this machine's CPUs did before and during the migration, the hypervisor's steal
  included: on a shared virtual machine, decoding slows with the neighbours as well as with us;
- whether every token matches the in-process engine.
With --repeat N it runs N migrations per queue discipline, each on a fresh network, and says
in how many the targets held.
A plot of every step's time and of a's link (all it sent, and its relay frames), with the
pre-copy and the switch marked, goes to out/migration_netns-QUEUE[-RUN].png.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from edgeheads.controller.spread import WorkerCapacity, spread
from edgeheads.headnode.cluster import ClusterExecutor
from edgeheads.headnode.engine import BlockEngine
from edgeheads.headnode.loading import load_model
from edgeheads.headnode.migrate import migrate
from edgeheads.common.spec import BlockKind
from netns_measure import TcSampler, between, cores_between, cores_text, cpu_times, lone_flow_rate  # noqa: E402

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
    out: list[int] = []
    token = [int(torch.argmax(await executor.step("s", prompt_ids)))]
    out += token
    origin = time.perf_counter()
    cpu = {"first": cpu_times()}
    sampler = TcSampler("a", origin)  # a's link, by tc's counters, until the switch is over
    sampler.start()
    task = None
    marks: dict[str, float] = {}
    done_after = None
    while done_after is None or len(out) < done_after + tokens_after:
        if len(out) == tokens_before and task is None:
            marks["start"] = time.perf_counter() - origin
            cpu["start"] = cpu_times()
            # weights from the source: this measures the worker-to-worker pull over the shaped link
            task = asyncio.create_task(migrate(executor, 2, new, addresses, timeout_seconds=600, weights_from="source"))
        t0 = time.perf_counter()
        token = [int(torch.argmax(await executor.step("s", token)))]
        steps.append((t0 - origin, time.perf_counter() - t0))
        out += token
        if task is not None and task.done() and done_after is None:
            done_after = len(out)
            marks["end"] = time.perf_counter() - origin
            cpu["end"] = cpu_times()
    report = task.result()
    sampler.stopped.set()
    sampler.join()
    await executor.close()
    window = (marks["start"], marks["start"] + report.precopy_seconds)
    marks["wire_bytes"] = between(sampler.series, *window, column=1)
    marks["relay_bytes"] = between(sampler.series, *window, column=2)
    marks["tc"] = sampler.series
    marks["cpu"] = (cores_between(cpu["first"], cpu["start"]), cores_between(cpu["start"], cpu["end"]))
    return out, steps, marks, report


def run_once(args, parts, prompt_ids, queue: str):
    """One migration under one queue discipline: (lone flow's bytes/s, tokens, steps, marks, report)."""
    tmp = Path(tempfile.mkdtemp(prefix="edgeheads-netns-"))
    procs: list[subprocess.Popen] = []
    setup_network(args.rate_mbit, queue)
    try:
        lone = lone_flow_rate("eh-a", "eh-b", NAMESPACES["b"])
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
        return lone, *asyncio.run(decode_with_migration(
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
    ap.add_argument("--repeat", type=int, default=1, help="migrations per queue discipline, each on a fresh network")
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
        for run in range(args.repeat):
            rows.append((queue, *report_run(args, parts, prompt_ids, queue, link, run)))
    print("\n| queue | pre-copy / link rate | pre-copy / lone TCP flow | relay frames | link idle "
          "| median step during / before | steal during (cores) | tokens identical |")
    print("|---|---|---|---|---|---|---|---|")
    for queue, fraction, of_lone, relay, idle, slowdown, steal, same in rows:
        print(f"| {queue} | {fraction:.3f} | {of_lone:.3f} | {relay:.3f} | {idle:.3f} | {slowdown:.2f}x | {steal:.2f} "
              f"| {same} |")
    for queue in queues:
        mine = [r for r in rows if r[0] == queue]
        if len(mine) > 1:
            print(f"{queue}: {len(mine)} runs; pre-copy / link rate median {statistics.median(r[1] for r in mine):.3f} "
                  f"(>= 0.9 in {sum(r[1] >= 0.9 for r in mine)}), / lone flow median "
                  f"{statistics.median(r[2] for r in mine):.3f} (>= 0.9 in {sum(r[2] >= 0.9 for r in mine)}); median "
                  f"step during / before: median {statistics.median(r[5] for r in mine):.2f}x "
                  f"(<= 1.3x in {sum(r[5] <= 1.3 for r in mine)})")


def report_run(args, parts, prompt_ids, queue: str, link: float, run: int):
    """One migration, printed; (pre-copy / link, / lone flow, relay share, idle share, median slowdown, same tokens)."""
    lone, out, steps, marks, report = run_once(args, parts, prompt_ids, queue)
    engine = BlockEngine(parts)
    ref, token = [], prompt_ids
    for _ in range(len(out)):
        token = [int(torch.argmax(engine.forward("s", token)))]
        ref += token
    before = [s for t, s in steps if t < marks["start"]]
    during = [s for t, s in steps if marks["start"] <= t < marks["end"]]
    token_time = statistics.median(before)
    rate = report.precopy_bytes / report.precopy_seconds
    relay = marks["relay_bytes"] / report.precopy_seconds / link
    idle = max(0.0, 1 - marks["wire_bytes"] / report.precopy_seconds / link)
    print(f"\n[{queue}, run {run}] model {args.model}; {len(report.moves)} blocks moved a -> b "
          f"({report.weights_skipped} without weights); link {args.rate_mbit} Mbit/s between two network "
          f"namespaces; pre-copy paced at {PRECOPY_LINK_FRACTION[queue]:g} of the measured link (0: unpaced)")
    print(f"one TCP flow alone over the link: {lone * 8 / 1e6:.1f} Mbit/s of payload, {lone / link:.3f} of the rate")
    print(f"pre-copy: {report.precopy_bytes / 1e6:.1f} MB in {report.precopy_seconds:.2f} s = "
          f"{rate * 8 / 1e6:.1f} Mbit/s: {rate / link:.3f} of the link rate, {rate / lone:.3f} of the lone flow "
          f"(target >= 0.9); over it a's relay frames took {relay:.3f} of the link and {idle:.3f} of it idled "
          "(tc's counters)")
    print(f"switch: {report.delta_bytes} bytes of new cache rows; steps held {report.stall_seconds * 1e3:.1f} ms "
          f"= {report.stall_seconds / token_time:.2f} token times")
    print(f"token time before the migration: median {token_time * 1e3:.1f} ms; during it: median "
          f"{statistics.median(during) * 1e3:.1f} ms ({statistics.median(during) / token_time:.2f}x, target "
          f"<= 1.3x), slowest {max(during) * 1e3:.1f} ms ({max(during) / token_time:.2f}x) over {len(during)} "
          f"steps")
    print(f"this machine's {os.cpu_count()} CPUs, in cores: before the migration {cores_text(marks['cpu'][0])}; "
          f"during it {cores_text(marks['cpu'][1])}")
    print(f"tokens identical to the in-process engine: {out == ref} ({len(out)} tokens)")
    suffix = f"-{run}" if args.repeat > 1 else ""
    plot(steps, marks, report, args.rate_mbit, queue, Path(f"out/migration_netns-{queue}{suffix}.png"))
    return (rate / link, rate / lone, relay, idle, statistics.median(during) / token_time, marks["cpu"][1][3],
            out == ref)

def plot(steps, marks, report, rate_mbit: int, queue: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax, link) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True, height_ratios=(3, 2))
    ax.plot([t for t, _ in steps], [s * 1e3 for _, s in steps], ".-", lw=0.8, label="decode step")
    for axis in (ax, link):
        axis.axvspan(marks["start"], marks["start"] + report.precopy_seconds, color="tab:orange", alpha=0.2,
                     label="pre-copy (decoding goes on)")
        axis.axvline(marks["end"], color="tab:red", lw=1,
                     label=f"switch (steps held {report.stall_seconds * 1e3:.0f} ms)")
    ax.set_ylabel("step time (ms)")
    ax.set_title(f"Decode step times while blocks migrate over a {rate_mbit} Mbit/s link ({queue} queue)")
    ax.legend(loc="upper right", fontsize=8)
    series = np.array(marks["tc"], dtype=float)
    dt = np.diff(series[:, 0])
    mid = (series[1:, 0] + series[:-1, 0]) / 2
    relay = np.diff(series[:, 2]) * 8 / 1e6 / dt
    everything = np.diff(series[:, 1]) * 8 / 1e6 / dt
    link.step(mid, everything, where="mid", color="tab:gray", label="all a sent")
    if relay.any():
        link.step(mid, relay, where="mid", color="tab:blue", label="relay frames")
    link.axhline(rate_mbit, color="black", lw=0.8, ls="--", label="link rate")
    link.set_xlabel("time (s)")
    link.set_ylabel("a's link (Mbit/s, tc)")
    link.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")

if __name__ == "__main__":
    main()
