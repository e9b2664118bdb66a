"""Every placement algorithm by name; all share (problem, previous) -> Placement | Infeasible."""

from __future__ import annotations

from typing import Callable

from edgeheads.controller.baselines import DynamicLayer, EdgeShard, Galaxy, Greedy, RoundRobin, Static
from edgeheads.controller.exact import Exact
from edgeheads.controller.problem import PlacementAlgorithm
from edgeheads.controller.resource_aware import ResourceAware

ALGORITHMS: dict[str, Callable[[], PlacementAlgorithm]] = {
    "resource-aware": ResourceAware,
    "greedy": Greedy,
    "round-robin": RoundRobin,
    "static": Static,
    "dynamic-layer": DynamicLayer,
    "edgeshard": EdgeShard,
    "galaxy": Galaxy,
    "exact": Exact,
}

DEFAULT_ALGORITHMS = ("resource-aware", "greedy", "round-robin", "static", "dynamic-layer", "edgeshard", "galaxy")
"""What ``simulate`` runs unless told otherwise (exact is only for small scenarios)."""


def make_algorithm(name: str) -> PlacementAlgorithm:
    """A fresh instance of the algorithm called ``name``."""
    try:
        return ALGORITHMS[name]()
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}") from None
