"""Decode tokens/s of a 3-worker loopback cluster vs the in-process engine, same run.

    python benchmarks/cluster_vs_local.py [--model smollm2-135m] [--new-tokens 128] [--workers 3]
                                          [--configs relay:spread,relay/grpc:spread,head:spread,...]
                                          [--repeats 3]

Each config is DATAFLOW[/TRANSPORT]:POLICY: relay (workers pass activations to each
other) or head (every phase is a round trip through the head node); for relay, how the
activations travel: tcp (the default, frames on the workers' relay ports) or grpc
(gRPC streams); and a placement policy.
The first config is the default one, the headline figure; the others are an ablation.
The in-process engine runs before and after the clusters and the ratio uses the mean
of the two, since this machine's speed drifts. Each config runs --repeats times
(rounds over all configs, so drift hits them alike); the table gives each config's
median run and lists every run's ratio, and the headline is the first config's median.

All runs use the same prompt greedily with EOS disabled, so each produces exactly
--new-tokens tokens (the script checks that the tokens are identical). Decode tokens/s
excludes the prefill. A network phase is one sequential hop of a step: its mean time
is the step time divided by the phases per token, and the network part of it is what
is left after the compute on the step's critical path (measured by the workers).
"""

from __future__ import annotations

import argparse


from edgeheads.headnode.client import Client
from edgeheads.headnode.embedded import LocalCluster
from edgeheads.headnode.loading import load_model
from edgeheads.headnode.local import LocalGenerator, set_threads
from edgeheads.headnode.sampling import SamplingParams
from edgeheads.v1 import headnode_pb2

PROMPT = "Write a short story about a robot who learns to paint."


def run_local(model, prompt_ids, params):
    local = LocalGenerator(load_model(model, progress=False))
    local.generate_ids(prompt_ids, SamplingParams(max_new_tokens=4))  # warm up
    return local.generate_ids(prompt_ids, params)


def run_cluster(args, prompt_ids, config: str):
    flow, policy = config.split(":")
    dataflow, _, transport = flow.partition("/")
    env = {"EDGEHEADS_HEADNODE__DATAFLOW": dataflow, "EDGEHEADS_CONTROLLER__POLICY": policy,
           "EDGEHEADS_HEADNODE__RELAY_TRANSPORT": transport or "tcp"}
    with LocalCluster(args.model, workers=args.workers, progress=False, extra_env=env) as cluster:
        client = Client(cluster.address)
        stub = client._stub
        list(stub.Generate(headnode_pb2.GenerateRequest(prompt_token_ids=prompt_ids, max_new_tokens=4)))  # warm up
        before = client.status()
        request = headnode_pb2.GenerateRequest(prompt_token_ids=prompt_ids, max_new_tokens=args.new_tokens)
        events = list(stub.Generate(request))
        status = client.status()
        client.close()
    tokens = [e.token_id for e in events if not e.done]
    phases = status["phases_run"] - before["phases_run"]
    mean_phase = (status["mean_phase_seconds"] * status["phases_run"]
                  - before["mean_phase_seconds"] * before["phases_run"]) / phases
    mean_compute = (status["mean_phase_compute_seconds"] * status["phases_run"]
                    - before["mean_phase_compute_seconds"] * before["phases_run"]) / phases
    return tokens, (len(tokens) - 1) / events[-1].decode_seconds, status["phases_per_token"], mean_phase, mean_compute


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--configs", default="relay:spread,relay/grpc:spread,head:spread,relay:round-robin,"
                                         "head:round-robin")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each config (the table shows the median)")
    args = ap.parse_args()
    set_threads()
    prompt_ids = LocalGenerator(load_model(args.model, progress=False)).encode(PROMPT)
    params = SamplingParams(max_new_tokens=args.new_tokens, stop_on_eos=False)
    ref = run_local(args.model, prompt_ids, params)
    configs = args.configs.split(",")
    runs: dict[str, list[tuple]] = {c: [] for c in configs}
    for _ in range(args.repeats):
        for config in configs:
            runs[config].append(run_cluster(args, prompt_ids, config))
    ref_after = run_local(args.model, prompt_ids, params)
    local_rate = (ref.decode_tokens_per_second + ref_after.decode_tokens_per_second) / 2
    print(f"model {args.model}, fp32, {len(prompt_ids)} prompt tokens, {args.new_tokens} new tokens, "
          f"{args.workers} workers on loopback")
    print(f"in-process engine: {ref.decode_tokens_per_second:.2f} decode tokens/s before the clusters, "
          f"{ref_after.decode_tokens_per_second:.2f} after, mean {local_rate:.2f}")
    print(f"{'dataflow/transport:policy':26s} {'tok/s':>7s} {'ratio':>7s} {'phases':>7s} {'phase us':>9s} "
          f"{'network us':>11s}  identical  every run's ratio")
    medians = {}
    for config in configs:
        ordered = sorted(runs[config], key=lambda r: r[1])
        tokens, rate, phases, mean_phase, mean_compute = medians[config] = ordered[len(ordered) // 2]
        same = all(r[0] == ref.token_ids[:len(r[0])] and len(r[0]) == args.new_tokens for r in runs[config])
        every = ", ".join(f"{r[1] / local_rate:.3f}" for r in runs[config])
        print(f"{config:26s} {rate:7.2f} {rate / local_rate:6.3f}x {phases:7d} {mean_phase * 1e6:9.0f} "
              f"{(mean_phase - mean_compute) * 1e6:11.0f}  {str(same):9s}  {every}")
    rate = medians[configs[0]][1]
    print(f"headline ({configs[0]}, median of {args.repeats}): cluster/in-process = {rate / local_rate:.3f}x "
          "(target >= 0.8)")


if __name__ == "__main__":
    main()
