"""Re-plans that pay (issue 14, scope 4): dynamic placement against the static plan when load
changes every few tokens, and when one device loses most of its compute for a long stretch.

    python benchmarks/bursty_replan.py [--seeds 1,2,3,4,5] [--new-tokens N] [--algorithm resource-aware]
                                       [--bursty FILE] [--long-lived FILE] [--json]

For every seed it runs the same code as ``edgeheads simulate`` (controller/simulator.py) on
benchmarks/scenarios/bursty.yaml and long_lived.yaml with the seed replaced, for:

- ``static``: the algorithm's first placement, never moved;
- ``ungated``: re-planned on every raw snapshot, every proposal adopted (the paper's loop);
- ``smoothed``: smoothed telemetry, every proposal adopted;
- ``gate only``: raw snapshots, the gate on;
- ``gated``: smoothed telemetry and the gate, the default (controller/replan_gate.py).

It prints total latency / static's total and migrations for each. In long_lived.yaml the
scripted event moves, per seed, to the device that holds the most compute of the static plan
(the seed draws another cluster, where the file's device may hold nothing).
Target (issue 14): gated / static <= 1.05 on every bursty seed, and < 1 on the long-lived run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from edgeheads.controller.algorithms import make_algorithm  # noqa: E402
from edgeheads.controller.problem import Placement, Problem  # noqa: E402
from edgeheads.controller.scenario import Setup, load_scenario, materialize  # noqa: E402
from edgeheads.controller.simulator import ReplanSettings, simulate  # noqa: E402

VARIANTS = {
    "ungated": ReplanSettings.off(),
    "smoothed": ReplanSettings(gate=False),
    "gate only": ReplanSettings(smoothing_tokens=0.0),
    "gated": ReplanSettings(),
}


def with_seed(path: Path, seed: int, new_tokens: int | None) -> Setup:
    scenario = load_scenario(path)
    update: dict = {"seed": seed, "name": f"{scenario.name}-{seed}"}
    if new_tokens:
        update["new_tokens"] = new_tokens
    return materialize(scenario.model_copy(update=update))


def busiest_device(setup: Setup, algorithm: str) -> str:
    """The device holding the most FLOPs of the algorithm's first placement."""
    sc = setup.scenario
    problem = Problem.build(setup.demand, setup.cluster, sc.prompt_tokens + 1, sc.interval_tokens,
                            sc.migration_horizon_tokens, setup.headnode)
    first = make_algorithm(algorithm).place(problem, None)
    assert isinstance(first, Placement), first
    flops = np.bincount(first.array(), weights=problem.flops, minlength=problem.n_devices)
    return setup.cluster.names[int(np.argmax(flops))]


def move_events(setup: Setup, device: str) -> Setup:
    bg = setup.scenario.background
    events = [e.model_copy(update={"device": device}) for e in bg.events]
    scenario = setup.scenario.model_copy(update={"background": bg.model_copy(update={"events": events})})
    return materialize(scenario)


def run_all(setup: Setup, algorithm: str) -> dict[str, dict]:
    static = simulate(setup, make_algorithm("static"))
    out = {"static": {"total_s": static.total_latency_seconds, "ratio": 1.0, "migrations": 0, "kept": 0}}
    for label, settings in VARIANTS.items():
        run = simulate(setup, make_algorithm(algorithm), settings)
        s = run.summary()
        out[label] = {"total_s": run.total_latency_seconds, "ratio": run.total_latency_seconds / static.total_latency_seconds,
                      "migrations": s["migrations"], "kept": s["kept_by_gate"]}
    return out


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1,2,3,4,5")
    p.add_argument("--new-tokens", type=int, default=None, help="override the scenarios' new_tokens")
    p.add_argument("--algorithm", default="resource-aware")
    p.add_argument("--bursty", type=Path, default=ROOT / "benchmarks" / "scenarios" / "bursty.yaml")
    p.add_argument("--long-lived", type=Path, default=ROOT / "benchmarks" / "scenarios" / "long_lived.yaml")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    results: dict[str, dict[int, dict]] = {"bursty": {}, "long-lived": {}}
    for seed in seeds:
        results["bursty"][seed] = run_all(with_seed(args.bursty, seed, args.new_tokens), args.algorithm)
        setup = with_seed(args.long_lived, seed, args.new_tokens)
        device = busiest_device(setup, args.algorithm)
        results["long-lived"][seed] = run_all(move_events(setup, device), args.algorithm)
        results["long-lived"][seed]["event_device"] = device
        print(f"seed {seed} done", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    labels = ["ungated", "smoothed", "gate only", "gated"]
    for scenario, by_seed in results.items():
        print(f"\n{scenario}: total latency / static (migrations, proposals kept by the gate), {args.algorithm}")
        print(f"{'seed':<6}{'static s':>10}" + "".join(f"{label:>22}" for label in labels))
        for seed, r in by_seed.items():
            cells = "".join(f"{r[label]['ratio']:>9.3f} ({r[label]['migrations']:>4}, {r[label]['kept']:>4})"
                            for label in labels)
            print(f"{seed:<6}{r['static']['total_s']:>10.1f}{cells}")
        worst = max(r["gated"]["ratio"] for r in by_seed.values())
        print(f"worst gated / static: {worst:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
