"""Every placement policy on the emulated testbed under the same scripted events (needs root).

    sudo python benchmarks/testbed_policies.py [--profile deploy/testbed/profiles/edge-events.yaml]
        [--policies edgeshard,dynamic-layer,spread,round-robin,resource-aware] [--tokens 512]
        [--dtype q4] [--out out]

Each policy gets a fresh testbed (deploy/testbed/testbed.py: one namespaced, shaped,
CPU-quota'd worker per board) and one greedy generation of --tokens tokens, with the profile's
events (a CPU hog on a board, a memory limit dropping, a board joining and one leaving) fired
at the same tokens. ``edgeshard`` is the static layer pipeline: planned once (re-planning
off), re-planned only when a worker leaves; the others re-plan every interval_tokens.

Prints, per policy: total decode time and tokens/s, the ratio of each to the static pipeline
in the same run, re-plans, migrations and bytes moved, and whether its tokens equal the first
policy's. Writes OUT/testbed-policies.json, a per-token timeline per policy with the events
marked (OUT/testbed-policies.png), and the controller's predicted token time against the
measured one for every placement that ran (OUT/testbed-fidelity.png), with the share within
+-15%. Quantized kernels are pinned (EDGEHEADS_KERNELS) so that every run computes alike.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "deploy" / "testbed"))

import testbed  # noqa: E402
import testbed_cgroup  # noqa: E402
from testbed_profile import load_profile  # noqa: E402

POLICIES = "edgeshard,dynamic-layer,spread,round-robin,resource-aware"
STATIC = "edgeshard"


def run_policy(profile, policy: str, tokens: int, prompt: str, dtype: str) -> dict:
    replan = 0 if policy == STATIC else None  # None: the profile's interval_tokens
    print(f"--- {policy}: starting the testbed", file=sys.stderr, flush=True)
    with testbed.Testbed(profile, policy, dtype=dtype, replan_every_tokens=replan) as bed:
        run = testbed.generate(bed, prompt, tokens)
    record = testbed.summary(run, profile, policy)
    print(f"--- {policy}: {record['tokens']} tokens in {record['decode_seconds']:.1f} s, "
          f"{record['replans']} plans, {record['migrations']} migrations", file=sys.stderr, flush=True)
    return record


def plot(records: list[dict], out: Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, axes = plt.subplots(len(records), 1, figsize=(11, 2.2 * len(records)), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], records):
        gaps = [1000 * (b - a) for a, b in zip(r["arrivals"], r["arrivals"][1:])]
        ax.plot(range(1, len(r["arrivals"])), gaps, lw=0.7)
        for e in r["events"]:
            ax.axvline(e["token"], color="crimson", lw=0.8, ls="--")
        ax.set_ylabel("ms/token")
        ax.set_yscale("log")
        ax.set_title(f"{r['policy']}: {r['decode_seconds']:.1f} s, {r['migrations']} migrations", fontsize=9)
    axes[-1, 0].set_xlabel("token (dashed: " + ", ".join(f"{e['kind']} {e['device']} @{e['token']}"
                                                           for e in records[0]["events"]) + ")")
    fig.tight_layout()
    timeline = out / "testbed-policies.png"
    fig.savefig(timeline, dpi=110)
    plt.close(fig)
    rows = [f for r in records for f in r["fidelity"] if f["predicted_token_seconds"]]
    fig, ax = plt.subplots(figsize=(5, 5))
    for r in records:
        pts = [(f["measured_token_seconds"] * 1000, f["predicted_token_seconds"] * 1000) for f in r["fidelity"]
               if f["predicted_token_seconds"]]
        if pts:
            ax.scatter(*zip(*pts), label=r["policy"], s=14)
    top = max([max(f["measured_token_seconds"], f["predicted_token_seconds"]) * 1000 for f in rows] or [1])
    ax.plot([0, top], [0, top], color="grey", lw=0.8)
    ax.fill_between([0, top], [0, 0.85 * top], [0, 1.15 * top], color="grey", alpha=0.15, label="+-15%")
    ax.set_xlabel("measured ms/token")
    ax.set_ylabel("predicted ms/token")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fidelity = out / "testbed-fidelity.png"
    fig.savefig(fidelity, dpi=110)
    plt.close(fig)
    return [timeline, fidelity]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default=str(REPO / "deploy" / "testbed" / "profiles" / "edge-events.yaml"))
    p.add_argument("--policies", default=POLICIES)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--dtype", default="q4")
    p.add_argument("--prompt", default="Write a long story about a robot who learns to paint.")
    p.add_argument("--out", default="out")
    args = p.parse_args()
    if os.geteuid() != 0 or not testbed_cgroup.available():
        print("needs root and cgroup v1's cpu controller", file=sys.stderr)
        return 2
    os.environ.setdefault("EDGEHEADS_KERNELS", "int8=int8pack,q4=int4pack")
    profile = load_profile(args.profile)
    tokens = args.tokens or profile.scenario.new_tokens
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = [run_policy(profile, policy, tokens, args.prompt, args.dtype) for policy in args.policies.split(",")]
    (out / "testbed-policies.json").write_text(json.dumps(records, indent=1))
    base = next((r for r in records if r["policy"] == STATIC), records[0])
    print(f"{'policy':16} {'tokens':>6} {'seconds':>8} {'tok/s':>7} {'time / static':>13} {'plans':>6} "
          f"{'migr.':>6} {'MiB moved':>9} same tokens")
    for r in records:
        same = r["token_ids"] == records[0]["token_ids"]
        print(f"{r['policy']:16} {r['tokens']:6d} {r['decode_seconds']:8.1f} {r['tokens_per_second'] or 0:7.2f} "
              f"{r['decode_seconds'] / base['decode_seconds']:13.2f} {r['replans']:6d} {r['migrations'] or 0:6d} "
              f"{(r['migrated_bytes'] or 0) / 2**20:9.1f} {'yes' if same else 'NO'}")
    rows = [f for r in records for f in r["fidelity"] if f["predicted_token_seconds"]]
    within = [f for f in rows if abs(f["predicted_over_measured"] - 1) <= 0.15]
    print(f"fidelity: {len(within)} of {len(rows)} placements predicted within +-15% of the measured token time")
    for r in records:
        for f in r["fidelity"]:
            print(f"  {r['policy']:16} epoch {f['epoch']:3d}: predicted {1000 * (f['predicted_token_seconds'] or 0):7.1f} "
                  f"ms, measured {1000 * f['measured_token_seconds']:7.1f} ms over {f['tokens']} tokens")
    for path in plot(records, out):
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
