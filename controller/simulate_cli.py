"""``edgeheads simulate``: run placement algorithms over a scenario file.

    edgeheads simulate SCENARIO.yaml [--algorithms a,b,...] [--json] [--plot DIR] [--no-replan-gate]
    edgeheads simulate --generate FAMILY [--count N] [--seed S] --out DIR

``edgeheads.controller.cli`` calls ``register(subparsers)``; nothing here starts a daemon.
Registering imports only the algorithm names; ``--plot`` needs the ``plots`` extra (matplotlib)
and ``exact`` the ``solver`` extra (OR-Tools).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeheads.common.cli import import_extra
from edgeheads.controller.algorithms import ALGORITHMS, DEFAULT_ALGORITHMS, make_algorithm, unknown_algorithm_message

if TYPE_CHECKING:
    from edgeheads.controller.simulator import RunResult


def register(subparsers: Any) -> None:
    """Add the ``simulate`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "simulate",
        help="simulate placement algorithms over a scenario (controller cost model)",
        description="Run placement algorithms token by token over a YAML scenario and report latency, "
        "memory and migrations. See docs/placement.md for the scenario format.",
    )
    p.add_argument("scenario", nargs="?", help="scenario YAML file")
    p.add_argument(
        "--algorithms",
        default=",".join(DEFAULT_ALGORITHMS),
        help=f"comma-separated, from: {', '.join(ALGORITHMS)} (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the figures per algorithm as JSON")
    p.add_argument("--plot", metavar="DIR", help="write latency and memory plots (PNG) into DIR")
    p.add_argument("--no-replan-gate", action="store_true",
                   help="plan on raw snapshots and adopt every proposal (default: resource-aware and dynamic-layer "
                   "plan on smoothed telemetry and move only when it pays; see docs/placement.md)")
    p.add_argument("--smoothing-tokens", type=float, default=None, metavar="T",
                   help="EWMA time constant of the gated algorithms' view, in tokens (default 4; 0: none)")
    p.add_argument("--generate", metavar="FAMILY",
                   help="write random scenarios of a family instead (see docs/placement.md)")
    p.add_argument("--count", type=int, default=1, help="with --generate: how many scenarios (default 1)")
    p.add_argument("--seed", type=int, default=0, help="with --generate: first seed (default 0)")
    p.add_argument("--out", metavar="DIR", help="with --generate: where to write them")
    p.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"edgeheads simulate: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Entry point for the subcommand; returns the exit code."""
    if args.generate:
        return _generate(args)
    if not args.scenario:
        return _fail("give a SCENARIO.yaml (or --generate FAMILY --out DIR)")
    names = [n.strip() for n in args.algorithms.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALGORITHMS]
    if unknown or not names:
        return _fail(unknown_algorithm_message(unknown))
    from edgeheads.controller.scenario import ScenarioError, load_scenario, materialize
    from edgeheads.controller.simulator import ReplanSettings, simulate

    # a missing extra fails before any run
    algorithms = {name: make_algorithm(name) for name in names}
    if args.plot:
        import_extra("matplotlib", "--plot")
    try:
        setup = materialize(load_scenario(args.scenario))
    except ScenarioError as err:
        return _fail(str(err))
    def settings(name: str) -> ReplanSettings:
        if args.no_replan_gate:
            return ReplanSettings.off()
        default = ReplanSettings.default_for(name)
        if args.smoothing_tokens is None or not default.gate:
            return default
        return ReplanSettings(smoothing_tokens=max(args.smoothing_tokens, 0.0))

    results = {name: simulate(setup, algorithm, settings(name)) for name, algorithm in algorithms.items()}
    if args.json:
        print(json.dumps(_as_json(setup.scenario.name, results), indent=2))
    else:
        _print_table(setup.scenario.name, results)
    if args.plot:
        for path in plot_runs(results, Path(args.plot), setup.scenario.name):
            print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _generate(args: argparse.Namespace) -> int:
    import yaml

    from edgeheads.controller.scenario import FAMILIES, generate

    if args.generate not in FAMILIES:
        return _fail(f"unknown scenario family {args.generate!r}; choose from {', '.join(FAMILIES)}")
    if not args.out:
        return _fail("--generate needs --out DIR")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed in range(args.seed, args.seed + max(args.count, 1)):
        data = generate(args.generate, seed)
        path = out / f"{data['name']}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        print(path)
    return 0


def _as_json(name: str, results: dict[str, RunResult]) -> dict[str, Any]:
    return {
        "scenario": name,
        "algorithms": {
            alg: {
                "summary": r.summary(),
                "per_token": {
                    "latency_seconds": [t.latency_seconds for t in r.tokens],
                    "migration_seconds": [t.migration_seconds for t in r.tokens],
                    "memory_sum_bytes": [t.memory_sum_bytes for t in r.tokens],
                    "memory_max_bytes": [t.memory_max_bytes for t in r.tokens],
                },
            }
            for alg, r in results.items()
        },
    }


def _print_table(name: str, results: dict[str, RunResult]) -> None:
    print(f"scenario {name}")
    header = f"{'algorithm':<16}{'total s':>12}{'mean s/tok':>12}{'last s/tok':>12}{'migr.':>7}{'migr. s':>10}{'paging s':>10}{'max mem GB':>11}{'decide ms':>10}{'kept':>6}"
    print(header)
    for alg, r in results.items():
        s = r.summary()
        if r.failed:
            print(f"{alg:<16} failed: {r.failed}")
            continue
        print(
            f"{alg:<16}{s['total_latency_seconds']:>12.3f}{s['mean_token_latency_seconds']:>12.4f}"
            f"{s['last_token_latency_seconds']:>12.4f}{s['migrations']:>7}{s['total_migration_seconds']:>10.2f}"
            f"{s['total_paging_seconds']:>10.2f}{s['peak_memory_max_bytes'] / 1e9:>11.3f}{1e3 * s['mean_decision_seconds']:>10.2f}{s['kept_by_gate']:>6}"
        )


def plot_runs(results: dict[str, RunResult], out: Path, title: str) -> list[Path]:
    """latency_vs_step.png and memory_vs_step.png in ``out``."""
    matplotlib = import_extra("matplotlib", "--plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, ylabel, key, scale in (
        ("latency_vs_step.png", "latency per token (s)", "latency_seconds", 1.0),
        ("memory_vs_step.png", "memory of the fullest device (GB)", "memory_max_bytes", 1e-9),
        ("memory_sum_vs_step.png", "memory, sum over devices (GB)", "memory_sum_bytes", 1e-9),
    ):
        fig, ax = plt.subplots(figsize=(7, 4))
        for alg, r in results.items():
            if r.tokens:
                ax.plot([t.step for t in r.tokens], [getattr(t, key) * scale for t in r.tokens], label=alg, lw=1)
        ax.set_xlabel("token step")
        ax.set_ylabel(ylabel)
        if key == "latency_seconds":
            ax.set_yscale("log")
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Standalone: ``python -m edgeheads.controller.simulate_cli simulate ...``."""
    parser = argparse.ArgumentParser(prog="edgeheads")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
