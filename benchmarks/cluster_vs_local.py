"""Decode tokens/s of a 3-worker loopback cluster vs the in-process engine, same run.

    python benchmarks/cluster_vs_local.py [--model smollm2-135m] [--new-tokens 128] [--workers 3]

Both sides run the same prompt greedily with EOS disabled, so both produce exactly
--new-tokens tokens (the script also checks that the tokens are identical). Decode
tokens/s excludes the prefill. The mean network phase is the head node's measured
wall time per phase (send to every worker of the phase, receive every reply),
averaged over the cluster run; per token there are `phases/token` of them.
"""

from __future__ import annotations

import argparse
import time


from edgeheads.headnode.client import Client
from edgeheads.headnode.embedded import LocalCluster
from edgeheads.headnode.loading import load_model
from edgeheads.headnode.local import LocalGenerator, set_threads
from edgeheads.headnode.sampling import SamplingParams
from edgeheads.v1 import headnode_pb2

PROMPT = "Write a short story about a robot who learns to paint."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--workers", type=int, default=3)
    args = ap.parse_args()
    set_threads()
    local = LocalGenerator(load_model(args.model, progress=False))
    prompt_ids = local.encode(PROMPT)
    params = SamplingParams(max_new_tokens=args.new_tokens, stop_on_eos=False)
    local.generate_ids(prompt_ids, SamplingParams(max_new_tokens=4))  # warm up
    t0 = time.perf_counter()
    ref = local.generate_ids(prompt_ids, params)
    local_wall = time.perf_counter() - t0
    del local

    with LocalCluster(args.model, workers=args.workers, progress=False) as cluster:
        client = Client(cluster.address)
        stub = client._stub
        request = headnode_pb2.GenerateRequest(prompt_token_ids=prompt_ids, max_new_tokens=4)
        list(stub.Generate(request))  # warm up the streams
        request = headnode_pb2.GenerateRequest(prompt_token_ids=prompt_ids, max_new_tokens=args.new_tokens)
        # the head node cannot disable EOS over the API; compare only when it ran the full length
        t0 = time.perf_counter()
        events = list(stub.Generate(request))
        cluster_wall = time.perf_counter() - t0
        status = client.status()
        client.close()
    tokens = [e.token_id for e in events if not e.done]
    done = events[-1]
    cluster_rate = (len(tokens) - 1) / done.decode_seconds
    n = min(len(tokens), len(ref.token_ids))
    print(f"model {args.model}, fp32, {len(prompt_ids)} prompt tokens, {args.new_tokens} new tokens, "
          f"{args.workers} workers on loopback")
    print(f"in-process engine : {ref.decode_tokens_per_second:7.2f} decode tokens/s  (wall {local_wall:.1f} s)")
    print(f"loopback cluster  : {cluster_rate:7.2f} decode tokens/s  (wall {cluster_wall:.1f} s, "
          f"{len(tokens)} tokens, {done.finish_reason})")
    print(f"ratio cluster/in-process: {cluster_rate / ref.decode_tokens_per_second:.3f}x  (target >= 0.6)")
    print(f"identical tokens (first {n}): {tokens[:n] == ref.token_ids[:n]}")
    print(f"network phases: {status['phases_per_token']} per token, mean {status['mean_phase_seconds'] * 1e6:.0f} us "
          f"per phase over {status['phases_run']} phases (send, worker compute, all replies), of which "
          f"{status['mean_phase_compute_seconds'] * 1e6:.0f} us is the slowest worker's compute")


if __name__ == "__main__":
    main()
