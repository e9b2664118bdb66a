"""Every placement policy on the emulated testbed under the same scripted events (needs root).

    sudo python benchmarks/testbed_policies.py [--profile deploy/testbed/profiles/edge-events.yaml ...]
        [--policies edgeshard,dynamic-layer,spread,round-robin,resource-aware] [--tokens 512]
        [--dtype q4] [--warmup 32] [--repeat 1] [--out out]

Each policy gets a fresh testbed (deploy/testbed/testbed.py: one namespaced, shaped,
CPU-quota'd worker per board) and one greedy generation of --tokens tokens, with the profile's
events (a CPU hog on a board, a memory limit dropping, a board joining and one leaving) fired
at the same tokens. ``edgeshard`` is the static layer pipeline: planned once (re-planning
off), re-planned only when a worker leaves; the others re-plan every interval_tokens.

Each run starts with a --warmup generation (the cluster's first request, from which the
controller calibrates its cost model: controller/calibration.py), then the measured one.

Prints, per profile and policy: total decode time and tokens/s, the ratio of each to the static
pipeline in the same run, re-plans, migrations and bytes moved, and whether its tokens equal the
first policy's. Writes OUT/testbed-policies-PROFILE.json, a per-token timeline per policy with
the events marked (OUT/testbed-policies-PROFILE.png), and, over every profile given, the
controller's predicted token time against the measured one for every placement that ran
(OUT/testbed-fidelity.png), with the share within +-15%. Quantized kernels are pinned
(EDGEHEADS_KERNELS) so that every run computes alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "deploy" / "testbed"))

import testbed  # noqa: E402
import testbed_cgroup  # noqa: E402
from testbed_profile import load_profile  # noqa: E402

POLICIES = "edgeshard,dynamic-layer,spread,round-robin,resource-aware"
STATIC = "edgeshard"


def run_policy(profile, policy: str, tokens: int, prompt: str, dtype: str, warmup: int, out: Path) -> dict:
    replan = 0 if policy == STATIC else None  # None: the profile's interval_tokens
    print(f"--- {profile.scenario.name} {policy}: starting the testbed", file=sys.stderr, flush=True)
    with testbed.Testbed(profile, policy, dtype=dtype, replan_every_tokens=replan) as bed:
        run = testbed.generate(bed, prompt, tokens, warmup_tokens=warmup)
        logs = out / "logs"
        logs.mkdir(exist_ok=True)
        for name in ("controller", "headnode"):  # why each plan was made or kept
            shutil.copyfile(bed.dir / f"{name}.log", logs / f"{profile.scenario.name}-{policy}-{name}.log")
    record = testbed.summary(run, profile, policy)
    print(f"--- {policy}: {record['tokens']} tokens in {record['decode_seconds']:.1f} s, "
          f"{record['replans']} plans, {record['migrations']} migrations", file=sys.stderr, flush=True)
    return record


def plot(records: list[dict], out: Path, name: str) -> Path | None:
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
        ax.set_title(f"{r['policy']}{' (round %d)' % r['round'] if r.get('round') else ''}: "
                     f"{r['decode_seconds']:.1f} s, {r['migrations']} migrations", fontsize=9)
    axes[-1, 0].set_xlabel("token (dashed: " + ", ".join(f"{e['kind']} {e['device']} @{e['token']}"
                                                           for e in records[0]["events"]) + ")")
    fig.tight_layout()
    timeline = out / f"testbed-policies-{name}.png"
    fig.savefig(timeline, dpi=110)
    plt.close(fig)
    return timeline


def plot_fidelity(records: list[dict], out: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [(r, f) for r in records for f in r["fidelity"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.5))
    for ax, key, measured, title in (
            (axes[0], "predicted_token_seconds", "measured_token_seconds", "as the controller predicts it while it runs"),
            (axes[1], "decision_token_seconds", "stretch_token_seconds", "as predicted when the placement was chosen")):
        top = 1.0
        for profile in sorted({r["profile"] for r, _ in rows}):
            pts = [(f.get(measured, f["measured_token_seconds"]) * 1000, f[key] * 1000) for r, f in rows
                   if r["profile"] == profile and f.get(key)]
            if pts:
                ax.scatter(*zip(*pts), label=f"{profile} ({len(pts)})", s=18)
                top = max(top, *(max(p) for p in pts))
        ax.plot([0, top], [0, top], color="grey", lw=0.8)
        ax.fill_between([0, top], [0, 0.85 * top], [0, 1.15 * top], color="grey", alpha=0.15, label="+-15%")
        ax.set_xlabel("measured ms/token")
        ax.set_ylabel("predicted ms/token")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("predicted against measured token time: every placement, under each set of conditions", fontsize=10)
    fig.tight_layout()
    fidelity = out / "testbed-fidelity.png"
    fig.savefig(fidelity, dpi=110)
    plt.close(fig)
    return fidelity


def report(records: list[dict]) -> None:
    """The table; each run against the static plan of its own round, and with several rounds
    (--repeat) each policy's total over them against the static plan's."""
    rounds = sorted({r.get("round", 0) for r in records})
    print(f"profile {records[0]['profile']}")
    print(f"{'policy':16} {'round':>5} {'tokens':>6} {'seconds':>8} {'tok/s':>7} {'time / static':>13} {'plans':>6} "
          f"{'migr.':>6} {'MiB moved':>9} same tokens")
    for r in records:
        same_round = [x for x in records if x.get("round", 0) == r.get("round", 0)]
        base = next((x for x in same_round if x["policy"] == STATIC), same_round[0])
        same = r["token_ids"] == records[0]["token_ids"]
        print(f"{r['policy']:16} {r.get('round', 0):5d} {r['tokens']:6d} {r['decode_seconds']:8.1f} "
              f"{r['tokens_per_second'] or 0:7.2f} {r['decode_seconds'] / base['decode_seconds']:13.2f} "
              f"{r['replans']:6d} {r['migrations'] or 0:6d} {(r['migrated_bytes'] or 0) / 2**20:9.1f} "
              f"{'yes' if same else 'NO'}")
    totals: dict[str, float] = {}
    for r in records:
        totals[r["policy"]] = totals.get(r["policy"], 0.0) + r["decode_seconds"]
    if len(rounds) > 1 and STATIC in totals:
        print(f"over {len(rounds)} rounds: " + ", ".join(
            f"{policy} {seconds:.1f} s ({seconds / totals[STATIC]:.2f} of static)" for policy, seconds in totals.items()))


def report_fidelity(records: list[dict]) -> None:
    rows = [f for r in records for f in r["fidelity"]]

    def share(key: str, measured: str, keep=lambda f: True) -> str:
        some = [f for f in rows if f.get(key) and keep(f)]
        within = [f for f in some if abs(f[key] / f.get(measured, f["measured_token_seconds"]) - 1) <= 0.15]
        return f"{len(within)} of {len(some)} ({100 * len(within) / max(1, len(some)):.0f}%)"

    print(f"fidelity, predicted while running: {share('predicted_token_seconds', 'measured_token_seconds')} "
          f"within +-15% of the measured token time")
    decided = "stretch_token_seconds"
    print(f"fidelity, predicted at decision:   {share('decision_token_seconds', decided)} within +-15% of the "
          f"stretch's; of those calibrated from earlier measurements: "
          f"{share('decision_token_seconds', decided, lambda f: f['basis'] == 'decision')}")
    for r in records:
        for f in r["fidelity"]:
            guess = 1000 * (f["predicted_token_seconds"] or 0)
            decided = 1000 * (f["decision_token_seconds"] or 0)
            print(f"  {r['profile']:12} {r['policy']:15} epoch {f['epoch']:3d} from {f['first_token']:3d}: measured "
                  f"{1000 * f['measured_token_seconds']:6.1f} ms over its last {f.get('measured_tokens', f['tokens'])}"
                  f" tokens, predicted {guess:6.1f} running; {1000 * f.get('stretch_token_seconds', 0):6.1f} ms over "
                  f"all {f['tokens']}, predicted {decided:6.1f} at decision ({f['basis']})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", action="append", help="a profile (repeat for several; default: edge-events)")
    p.add_argument("--policies", default=POLICIES)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--dtype", default="q4")
    p.add_argument("--prompt", default="Write a long story about a robot who learns to paint.")
    p.add_argument("--warmup", type=int, default=32, help="tokens of the warm-up generation (0: none)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the policies this many times over, interleaved; the totals are compared too")
    p.add_argument("--out", default="out")
    args = p.parse_args()
    if os.geteuid() != 0 or not testbed_cgroup.available():
        print("needs root and cgroup v1's cpu controller", file=sys.stderr)
        return 2
    os.environ.setdefault("EDGEHEADS_KERNELS", "int8=int8pack,q4=int4pack")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    everything = []
    for path in args.profile or [str(REPO / "deploy" / "testbed" / "profiles" / "edge-events.yaml")]:
        profile = load_profile(path)
        tokens = args.tokens or profile.scenario.new_tokens
        records = []
        for round_ in range(args.repeat):  # interleaved: a slow spell of the machine hits every policy
            for policy in args.policies.split(","):
                records.append({**run_policy(profile, policy, tokens, args.prompt, args.dtype, args.warmup, out),
                                "round": round_})
        name = profile.scenario.name
        (out / f"testbed-policies-{name}.json").write_text(json.dumps(records, indent=1))
        report(records)
        picture = plot(records, out, name)
        if picture:
            print(f"plot: {picture}")
        everything += records
    report_fidelity(everything)
    picture = plot_fidelity(everything, out)
    if picture:
        print(f"plot: {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
