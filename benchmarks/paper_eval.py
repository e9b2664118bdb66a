"""Reproduce the paper's evaluation (§V) with the controller's cost model and simulator.

    python benchmarks/paper_eval.py [--out out/paper_eval] [--quick] [--small-instances 30] [--medium-seeds 1]

(a) small scale: 3-5 devices, each method's total latency over a short generation as a
    ratio to the exact per-interval optimum (CP-SAT / exhaustive), >= 30 instances;
(b) medium scale: 25 devices, 2-8 GB, 5-50 GFLOPS, 0.1-1 Gbit/s, 1000 tokens with
    background load: latency and memory against the step, and resource-aware's speedup
    over every other method, with compute-only and compute+memory background load;
(c) decision time against devices and blocks, and the two targets (SmolLM2-sized
    problem on 25 devices, 7B-sized problem on 100 devices).

Prints tables and writes PNG plots into --out. Everything is simulated: the numbers are
what the cost model says, not measurements of the runtime.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from edgeheads.controller import costmodel
from edgeheads.controller.algorithms import DEFAULT_ALGORITHMS, make_algorithm
from edgeheads.controller.exact import Exact
from edgeheads.controller.instances import model_problem, perturbed
from edgeheads.controller.problem import Infeasible, ModelDemand, Problem
from edgeheads.controller.resource_aware import ResourceAware
from edgeheads.controller.scenario import generate, materialize, parse_scenario
from edgeheads.controller.simulate_cli import plot_runs
from edgeheads.controller.simulator import simulate
from edgeheads.common.spec import LLAMA2_7B, SMOLLM2_135M, ModelShape


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- (a)


def small_scale(n_instances: int, out: Path) -> dict[str, list[float]]:
    print(f"\n(a) small scale: {n_instances} paper-small scenarios (3-5 devices, 2 layers, 24 tokens, a decision every 4)")
    ratios: dict[str, list[float]] = {name: [] for name in DEFAULT_ALGORITHMS}
    first_decision: dict[str, list[float]] = {name: [] for name in DEFAULT_ALGORITHMS}
    failed = {name: 0 for name in DEFAULT_ALGORITHMS}
    gaps: list[float] = []
    exact_seconds: list[float] = []
    used = 0
    seed = 0
    while used < n_instances and seed < 10 * n_instances:
        setup = materialize(parse_scenario(generate("paper-small", seed)))
        seed += 1
        exact = Exact(time_limit_seconds=20)
        optimum = simulate(setup, exact)
        if optimum.failed:
            continue  # infeasible instance: nobody can place it
        used += 1
        gaps.append(exact.last.gap or 0.0)
        exact_seconds.append(optimum.summary()["mean_decision_seconds"])
        # first decision alone: the clean single-interval comparison
        sc = setup.scenario
        first = Problem.build(setup.demand, setup.cluster, sc.prompt_tokens + 1, sc.interval_tokens, 0, setup.headnode)
        best = exact.solve(first, None).objective_seconds
        for name in DEFAULT_ALGORITHMS:
            run = simulate(setup, make_algorithm(name))
            if run.failed:
                failed[name] += 1
                continue
            ratios[name].append(run.total_latency_seconds / optimum.total_latency_seconds)
            decision = make_algorithm(name).place(first, None)
            if not isinstance(decision, Infeasible):
                first_decision[name].append(costmodel.objective_seconds(first, decision) / best)
    print(f"    {used} feasible instances; exact: CP-SAT/exhaustive, worst gap {max(gaps):.2g}, "
          f"mean decision {1e3 * statistics.mean(exact_seconds):.1f} ms")
    print(f"    {'method':<16}{'total/opt mean':>15}{'median':>8}{'max':>8}{'1st decision/opt':>18}{'failed':>8}")
    for name in DEFAULT_ALGORITHMS:
        r, f = ratios[name], first_decision[name]
        if r:
            print(f"    {name:<16}{statistics.mean(r):>15.3f}{statistics.median(r):>8.3f}{max(r):>8.3f}"
                  f"{statistics.mean(f):>18.3f}{failed[name]:>8}")
        else:
            print(f"    {name:<16}{'-':>15}{'-':>8}{'-':>8}{'-':>18}{failed[name]:>8}")
    print("    (total/opt < 1 is possible: the exact solver is optimal per interval, not over the whole run;"
          " means are over the instances a method could place)")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [n for n in DEFAULT_ALGORITHMS if ratios[n]]
    ax.boxplot([ratios[n] for n in names], tick_labels=names, showmeans=True)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("total latency / exact optimum")
    ax.set_yscale("log")
    ax.set_title(f"small scale ({used} instances, 3-5 devices)")
    plt.setp(ax.get_xticklabels(), rotation=20, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "small_scale_ratio.png", dpi=120)
    plt.close(fig)
    return ratios


# ----------------------------------------------------------------------------- (b)


def medium_scale(seeds: list[int], out: Path, new_tokens: int) -> None:
    # Same random stream in every variant (a zero-width uniform still draws), so the
    # background jobs start at the same tokens on the same devices.
    variants = {
        "no-load": {"compute_fraction": {"uniform": [0.0, 0.0]}, "memory_fraction": {"uniform": [0.0, 0.0]}},
        "compute-load": {"memory_fraction": {"uniform": [0.0, 0.0]}},
        "compute+memory-load": {},
    }
    for variant, override in variants.items():
        print(f"\n(b) medium scale, {variant}: 25 devices, 2-8 GB, 5-50 GFLOPS, 0.1-1 Gbit/s, llama2-7b fp16, "
              f"{new_tokens} tokens, decision every token, seeds {seeds}")
        totals: dict[str, list[float]] = {name: [] for name in DEFAULT_ALGORITHMS}
        last: dict[str, list[float]] = {name: [] for name in DEFAULT_ALGORITHMS}
        peaks: dict[str, list[float]] = {name: [] for name in DEFAULT_ALGORITHMS}
        extra: dict[str, list[tuple[float, float, int]]] = {name: [] for name in DEFAULT_ALGORITHMS}
        for seed in seeds:
            data = generate("paper-medium", seed)
            data["new_tokens"] = new_tokens
            data["background"].update(override)
            setup = materialize(parse_scenario(data))
            runs = {}
            for name in DEFAULT_ALGORITHMS:
                run = simulate(setup, make_algorithm(name))
                runs[name] = run
                s = run.summary()
                totals[name].append(run.total_latency_seconds)
                last[name].append(float(s["last_token_latency_seconds"] or np.nan))
                peaks[name].append(float(s["peak_memory_max_bytes"]))
                extra[name].append((float(s["total_paging_seconds"]), run.total_migration_seconds, int(s["migrations"])))
            if seed == seeds[0]:
                plot_runs(runs, out / f"medium_{variant}", f"25 devices, {variant}, seed {seed}")
        ra = np.array(totals["resource-aware"])
        print("    (means over seeds; RA speedup = mean over seeds of method total / resource-aware total)")
        print(f"    {'method':<16}{'total s':>10}{'last s/tok':>11}{'paging s':>10}{'migr. s':>9}{'migr.':>7}"
              f"{'peak GB':>9}{'RA speedup':>11}")
        for name in DEFAULT_ALGORITHMS:
            t = np.array(totals[name])
            paging, migr, count = (float(np.mean([e[i] for e in extra[name]])) for i in range(3))
            print(f"    {name:<16}{t.mean():>10.1f}{np.nanmean(last[name]):>11.3f}{paging:>10.1f}{migr:>9.1f}"
                  f"{count:>7.0f}{np.mean(peaks[name]) / 1e9:>9.2f}{np.mean(t / ra):>10.2f}x")


# ----------------------------------------------------------------------------- (c)


def _decision_ms(problem: Problem, warm: bool, repeats: int) -> float:
    algorithm = ResourceAware()
    previous = algorithm.place(problem, None) if warm else None
    target = perturbed(problem, 7, compute_noise=0.5) if warm else problem
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        decision = algorithm.place(target, previous)
        times.append(time.perf_counter() - started)
        assert not isinstance(decision, Infeasible), decision
    return 1e3 * statistics.median(times)


def decision_time(out: Path, repeats: int, quick: bool) -> None:
    print("\n(c) resource-aware decision time (median of repeats; cold = no previous placement, "
          "warm = previous placement after 0-50% compute changes)")
    devices = [5, 10, 25, 50, 100] if not quick else [5, 25, 100]
    by_devices = [(n, _decision_ms(model_problem(LLAMA2_7B, n, seed=n), False, repeats),
                   _decision_ms(model_problem(LLAMA2_7B, n, seed=n), True, repeats)) for n in devices]
    print("    llama2-7b (320 blocks): devices, cold ms, warm ms")
    for n, cold, warm in by_devices:
        print(f"      {n:>4} {cold:>8.1f} {warm:>8.1f}")
    layers = [4, 8, 16, 32, 64] if not quick else [4, 16, 64]
    by_blocks = []
    for n_layers in layers:
        shape = ModelShape(**{**LLAMA2_7B.to_dict(), "n_layers": n_layers})
        pr = model_problem(shape, 25, seed=n_layers)
        by_blocks.append((pr.n_blocks, _decision_ms(pr, False, repeats), _decision_ms(pr, True, repeats)))
    print("    25 devices, 7B-shaped layers: blocks, cold ms, warm ms")
    for blocks, cold, warm in by_blocks:
        print(f"      {blocks:>4} {cold:>8.1f} {warm:>8.1f}")
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, rows, xlabel in ((axes[0], by_devices, "devices (320 blocks)"), (axes[1], by_blocks, "blocks (25 devices)")):
        ax.plot([r[0] for r in rows], [r[1] for r in rows], "o-", label="cold")
        ax.plot([r[0] for r in rows], [r[2] for r in rows], "s-", label="warm")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("decision time (ms)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "decision_time.png", dpi=120)
    plt.close(fig)

    print("    targets:")
    for label, shape, n, target_ms in (
        ("SmolLM2-135M, 30 layers x 5 blocks, 25 devices", SMOLLM2_135M, 25, 10.0),
        ("7B, 32 layers x (8 KV groups + 2), 100 devices", LLAMA2_7B, 100, 200.0),
    ):
        cold = statistics.median(_decision_ms(model_problem(shape, n, seed=s), False, repeats) for s in range(3))
        warm = statistics.median(_decision_ms(model_problem(shape, n, seed=s), True, repeats) for s in range(3))
        print(f"      {label}: cold {cold:.1f} ms, warm {warm:.1f} ms; target {target_ms:.0f} ms "
              f"(cold at {cold / target_ms:.2f}x of target)")
    blocks = len(ModelDemand.from_shape(LLAMA2_7B).blocks)
    assert blocks == 32 * 10


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/paper_eval", help="directory for the PNG plots (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="fewer instances and tokens, for a smoke run")
    parser.add_argument("--small-instances", type=int, default=None, help="(a): instances (default 30, quick 8)")
    parser.add_argument("--medium-seeds", type=int, default=None, help="(b): scenarios per variant (default 2, quick 1)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: a,b,c")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(args.skip.split(","))
    started = time.perf_counter()
    if "a" not in skip:
        small_scale(args.small_instances or (8 if args.quick else 30), out)
    if "b" not in skip:
        medium_scale(list(range(args.medium_seeds or (1 if args.quick else 2))), out, 200 if args.quick else 1000)
    if "c" not in skip:
        decision_time(out, 3 if args.quick else 5, args.quick)
    print(f"\nplots in {out}/ ; total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
