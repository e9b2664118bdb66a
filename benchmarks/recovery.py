"""What recovering from a lost worker costs: the time from a worker's SIGKILL to the next
token, and the bytes moved, on a 3-worker loopback cluster, at several context lengths.

    python benchmarks/recovery.py [--model smollm2-135m] [--contexts 64,512,1024]
                                  [--new-tokens 16] [--kill-after 8] [--victim worker-1]
                                  [--dataflow relay]

For each context length a fresh cluster runs the same greedy generation twice: once
undisturbed (the baseline: its prefill, the time to the first token, and its median time
per decoded token), then again with the victim
SIGKILLed as soon as --kill-after tokens have arrived. The gap between the kill and the next
token is what a client waits for the recovery (noticing the loss, the controller's new
placement, shipping the lost blocks from the head node, replaying every live session's
steps: here one prefill of the context and --kill-after decode steps). The ratio divides it
by the baseline's time per token. The prompt is the first N tokens of a fixed text, so the
context at the kill is N + --kill-after tokens.

Bytes moved come from the head node's metrics: the weights it shipped to the survivors,
and the activations the replay put on the network (computed from the step plan: what each
replayed token sends between the head node and the workers and between workers). Nothing
else of size travels: no K/V cache is copied, and the unload, drop and program messages are
a few hundred bytes. The head node's own breakdown (probing and waiting for the controller,
shipping, replaying) is read from its log.

What TLS and the cluster token cost per token (the third figure of the recovery issue) is
measured by benchmarks/tls_cost.py: the same cluster's decode tokens/s with TLS+token against
plaintext, and one relay hop's round trip with and without TLS.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import time
import urllib.request

import grpc

from edgeheads.headnode.embedded import LocalCluster
from edgeheads.headnode.loading import load_model
from edgeheads.v1 import headnode_pb2, headnode_pb2_grpc

TEXT = ("Edge boards drop off Wi-Fi, overheat and get unplugged. A cluster of them can still serve a language model "
        "if every layer's heads, projection and feed-forward blocks are spread over the boards, and if the head node "
        "that holds every token of every session can rebuild what a lost board held. ")
REPORT = re.compile(r"recovered to epoch \d+ without .* in ([\d.]+) s \(([\d.]+) probing and waiting for the "
                    r"controller, ([\d.]+) shipping \d+ bytes of weights, ([\d.]+) replaying (\d+) steps")


def prompt_ids(tokenizer, length: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < length:
        ids += tokenizer(TEXT, add_special_tokens=False).input_ids
    return ids[:length]


def generate(address: str, ids: list[int], new_tokens: int, on_token=None) -> list[tuple[int, float]]:
    """(token id, arrival time) of each generated token, after (-1, the time the request left)."""
    request = headnode_pb2.GenerateRequest(prompt_token_ids=ids, max_new_tokens=new_tokens)
    out: list[tuple[int, float]] = []
    sent = time.perf_counter()
    with grpc.insecure_channel(address) as channel:
        for event in headnode_pb2_grpc.HeadnodeStub(channel).Generate(request, timeout=900):
            if not event.done:
                out.append((event.token_id, time.perf_counter()))
                if on_token is not None:
                    on_token(len(out))
    return [(-1, sent), *out]


def scrape(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in lines if line and not line.startswith("#"))}


def run(args, tokenizer, context: int) -> dict:
    ids = prompt_ids(tokenizer, context)
    env = {"EDGEHEADS_HEADNODE__DATAFLOW": args.dataflow, "EDGEHEADS_CONTROLLER__REPLAN_EVERY_TOKENS": "0"}
    with LocalCluster(args.model, workers=3, progress=False, extra_env=env) as cluster:
        generate(cluster.address, ids[:8], 4)  # warm up
        (_, sent), *base = generate(cluster.address, ids, args.new_tokens)
        prefill = base[0][1] - sent
        per_token = statistics.median(b[1] - a[1] for a, b in zip(base, base[1:]))
        killed = {}

        def kill(count: int) -> None:
            if count == args.kill_after:
                killed["at"] = time.perf_counter()
                os.kill(cluster.procs[args.victim].pid, signal.SIGKILL)
        got = generate(cluster.address, ids, args.new_tokens, kill)[1:]  # kill() runs as tokens arrive
        metrics = scrape(cluster.metrics["headnode"])
        report = REPORT.search(cluster.log_tail("headnode", 200))
    gap = got[args.kill_after][1] - killed["at"]
    return dict(context=context, prefill=prefill, per_token=per_token, gap=gap,
                identical=[t for t, _ in got] == [t for t, _ in base],
                weights=metrics.get('edgeheads_recovery_bytes_total{kind="weights"}', 0.0),
                activations=metrics.get('edgeheads_recovery_bytes_total{kind="activations"}', 0.0),
                replayed=metrics.get("edgeheads_replayed_tokens_total", 0.0),
                breakdown=tuple(float(x) for x in report.groups()[:4]) if report else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--contexts", default="64,512,1024")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--kill-after", type=int, default=8, help="tokens of the generation before the SIGKILL")
    ap.add_argument("--victim", default="worker-1")
    ap.add_argument("--dataflow", default="relay", choices=["relay", "head"])
    args = ap.parse_args()
    if not 0 < args.kill_after < args.new_tokens:
        ap.error("--kill-after must lie between 0 and --new-tokens")
    tokenizer = load_model(args.model, progress=False).tokenizer
    rows = [run(args, tokenizer, int(c)) for c in args.contexts.split(",")]
    print(f"\n{args.model}, 3 workers, {args.dataflow} dataflow, {args.victim} SIGKILLed after {args.kill_after} of "
          f"{args.new_tokens} new tokens; one live session")
    print(f"{'context':>8} {'prefill s':>9} {'ms/token':>9} {'kill->next s':>12} {'ratio':>7} {'weights MB':>10} "
          f"{'activ. MB':>9} {'replayed':>8} {'detect s':>8} {'ship s':>7} {'replay s':>8} {'identical':>9}")
    for r in rows:
        detect, ship, replay = r["breakdown"][1:] if r["breakdown"] else (float("nan"),) * 3
        print(f"{r['context']:>8} {r['prefill']:>9.2f} {r['per_token'] * 1e3:>9.1f} {r['gap']:>12.2f} "
              f"{r['gap'] / r['per_token']:>6.0f}x {r['weights'] / 1e6:>10.1f} {r['activations'] / 1e6:>9.1f} "
              f"{r['replayed']:>8.0f} {detect:>8.2f} {ship:>7.2f} {replay:>8.2f} {str(r['identical']):>9}")


if __name__ == "__main__":
    main()
