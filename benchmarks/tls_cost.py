"""What mutual TLS and the cluster token cost per token: decode tokens/s of a loopback cluster
with both against the same cluster in plaintext, same run.

    python benchmarks/tls_cost.py [--model smollm2-135m] [--new-tokens 128] [--workers 3]
                                  [--repeats 3] [--modes plaintext,tls+token,tls,token]
                                  [--transport tcp]

Each mode is a fresh LocalCluster (a controller, --workers workers, a head node) whose daemons
read their ``security`` section from the environment: ``plaintext`` (nothing), ``tls`` (mutual
TLS on every gRPC port and on the relay TCP port, certificates made for the run with
edgeheads.common.certs), ``token`` (the cluster token on every RPC and relay hello, no TLS) and
``tls+token`` (both, what a secured cluster runs). The first mode is the baseline, the second
the headline. Modes run in rounds, --repeats times, so this machine's drift hits them alike; the
table gives each mode's median run and every run, and the headline ratio is the medians'.

All runs decode the same prompt greedily, so the tokens must be identical (the script checks).
Decode tokens/s excludes the prefill. The relay hop is the hot path: with --transport tcp (the
default) every activation crosses a worker's relay port, where TLS encrypts each frame. Since
the clusters' tokens/s vary more between runs than TLS could change them, the script first
measures that part alone: relay frames of an activation's size echoed over loopback in one
process, plaintext against TLS (the median of --hop-rounds rounds of 2,000 round trips each).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from edgeheads.common.certs import make_ca, make_node_cert, write_bundle
from edgeheads.common.relay_wire import Kind, encode, read_frame
from edgeheads.common.security import SecuritySettings, load_security
from edgeheads.headnode.client import Client
from edgeheads.headnode.embedded import LocalCluster
from edgeheads.headnode.loading import load_model
from edgeheads.headnode.local import LocalGenerator, set_threads
from edgeheads.v1 import headnode_pb2

PROMPT = "Write a short story about a robot who learns to paint."
FRAME_BYTES = 2304  # one SmolLM2 activation: 576 fp32 numbers
TOKEN = "benchmark-cluster-token-0123456789abcdef"
MODES = ("plaintext", "tls+token", "tls", "token")


def make_certs(directory: Path) -> None:
    """ca.crt, node.crt/key (every daemon) and client.crt/key (this script), for 127.0.0.1."""
    ca_key, ca_cert = make_ca("tls_cost CA", 2)
    for name in ("node", "client"):
        key, cert = make_node_cert(ca_key, ca_cert, name, ["127.0.0.1"], 2)
        write_bundle(directory, name, key, cert, ca_cert_pem=ca_cert)


def mode_env(mode: str, certs: Path) -> dict[str, str]:
    env = {}
    if "tls" in mode:
        env |= {"EDGEHEADS_SECURITY__TLS_DIR": str(certs), "EDGEHEADS_SECURITY__TLS_NAME": "node"}
    if "token" in mode:
        env["EDGEHEADS_SECURITY__TOKEN"] = TOKEN
    return env


async def frame_round_trips(tls: bool, certs: Path, count: int = 2000) -> float:
    """Microseconds per round trip of one relay frame (two hops) over loopback, in this process."""
    server_ctx, client_ctx = load_security(SecuritySettings(tls_dir=certs, tls_name="node")).ssl_contexts
    frame = encode(Kind.BATCH, bytes(FRAME_BYTES))

    finished = asyncio.Event()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (got := await read_frame(reader, 1 << 20)) is not None:
            writer.write(encode(*got))
        writer.close()
        finished.set()
    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_ctx if tls else None)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx if tls else None,
                                                   server_hostname="127.0.0.1" if tls else None)
    for warm_up in (True, False):
        start = time.perf_counter()
        for _ in range(200 if warm_up else count):
            writer.write(frame)
            await read_frame(reader, 1 << 20)
    seconds = time.perf_counter() - start
    writer.close()
    await finished.wait()
    server.close()
    await server.wait_closed()
    return seconds / count * 1e6


def hop_cost(certs: Path, rounds: int) -> tuple[float, float]:
    """(plaintext, TLS) median microseconds per frame round trip, in alternating rounds."""
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for tls in (False, True):
            times[tls].append(asyncio.run(frame_round_trips(tls, certs)))
    return statistics.median(times[False]), statistics.median(times[True])


def run_cluster(args, prompt_ids: list[int], mode: str, certs: Path) -> tuple[list[int], float]:
    env = {"EDGEHEADS_HEADNODE__RELAY_TRANSPORT": args.transport, **mode_env(mode, certs)}
    security = load_security(SecuritySettings(tls_dir=certs if "tls" in mode else None,
                                              tls_name="client" if "tls" in mode else None,
                                              token=TOKEN if "token" in mode else None))
    with LocalCluster(args.model, workers=args.workers, progress=False, extra_env=env) as cluster, \
            Client(cluster.address, security=security) as client:
        stub = client._stub
        list(stub.Generate(headnode_pb2.GenerateRequest(prompt_token_ids=prompt_ids, max_new_tokens=4)))  # warm up
        events = list(stub.Generate(headnode_pb2.GenerateRequest(prompt_token_ids=prompt_ids,
                                                                 max_new_tokens=args.new_tokens)))
    tokens = [e.token_id for e in events if not e.done]
    return tokens, (len(tokens) - 1) / events[-1].decode_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each mode (the table shows the median)")
    ap.add_argument("--modes", default="plaintext,tls+token",
                    help=f"comma-separated, baseline first, headline second; from {', '.join(MODES)}")
    ap.add_argument("--transport", choices=["tcp", "grpc"], default="tcp", help="the relay transport (tcp)")
    ap.add_argument("--hop-rounds", type=int, default=5, help="rounds of the relay frame echo (5)")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if len(modes) < 2 or not set(modes) <= set(MODES):
        ap.error(f"--modes needs at least two of {', '.join(MODES)}")
    set_threads()
    prompt_ids = LocalGenerator(load_model(args.model, progress=False)).encode(PROMPT)
    runs: dict[str, list[tuple[list[int], float]]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="tls-cost-") as tmp:
        certs = Path(tmp)
        make_certs(certs)
        plain_us, tls_us = hop_cost(certs, args.hop_rounds)
        for _ in range(args.repeats):
            for mode in modes:
                runs[mode].append(run_cluster(args, prompt_ids, mode, certs))
    reference = runs[modes[0]][0][0]
    print(f"relay frame of {FRAME_BYTES} bytes echoed over loopback (one process, median of {args.hop_rounds} "
          f"rounds): {plain_us:.1f} us per round trip in plaintext, {tls_us:.1f} us with TLS, so TLS adds "
          f"{(tls_us - plain_us) / 2:.1f} us per hop")
    print(f"model {args.model}, fp32, {len(prompt_ids)} prompt tokens, {args.new_tokens} new tokens, "
          f"{args.workers} workers on loopback, relay transport {args.transport}, {args.repeats} rounds")
    print(f"{'mode':12s} {'median tok/s':>12s} {'ratio':>7s}  identical  every run's tok/s")
    medians = {mode: statistics.median(rate for _, rate in runs[mode]) for mode in modes}
    for mode in modes:
        same = all(tokens == reference for tokens, _ in runs[mode])
        every = ", ".join(f"{rate:.2f}" for _, rate in runs[mode])
        print(f"{mode:12s} {medians[mode]:12.2f} {medians[mode] / medians[modes[0]]:6.3f}x  {str(same):9s}  {every}")
    print(f"headline: {modes[1]} / {modes[0]} decode tokens/s = {medians[modes[1]] / medians[modes[0]]:.3f}x "
          f"(median of {args.repeats})")


if __name__ == "__main__":
    main()
