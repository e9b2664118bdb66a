"""Every placement algorithm by name; all share (problem, previous) -> Placement | Infeasible.

The table names the class and its module, imported on first use, so that the names are known
(``edgeheads simulate --help``, the controller's policy check, the dispatcher) without importing
the algorithms, and ``exact`` without OR-Tools (the ``solver`` extra) until it is used.

Names are distinct from the runtime's simple policies (controller/spread.py): the runtime's
``round-robin`` spreads each layer's KV groups over the workers that do not project it, while the
simulator's ``block-round-robin`` deals every block in execution order to the devices in turn
(the paper's round-robin baseline). See docs/placement.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from edgeheads.common.cli import import_extra

if TYPE_CHECKING:
    from edgeheads.controller.problem import PlacementAlgorithm

_WHERE: dict[str, tuple[str, str]] = {
    "resource-aware": ("edgeheads.controller.resource_aware", "ResourceAware"),
    "greedy": ("edgeheads.controller.baselines", "Greedy"),
    "block-round-robin": ("edgeheads.controller.baselines", "BlockRoundRobin"),
    "static": ("edgeheads.controller.baselines", "Static"),
    "dynamic-layer": ("edgeheads.controller.baselines", "DynamicLayer"),
    "edgeshard": ("edgeheads.controller.baselines", "EdgeShard"),
    "galaxy": ("edgeheads.controller.baselines", "Galaxy"),
    "exact": ("edgeheads.controller.exact", "Exact"),
}


def _factory(name: str) -> Callable[[], PlacementAlgorithm]:
    module, cls = _WHERE[name]

    def make() -> PlacementAlgorithm:
        return getattr(import_extra(module, f"the {name!r} placement algorithm"), cls)()

    make.__qualname__ = make.__name__ = cls
    return make


ALGORITHMS: dict[str, Callable[[], PlacementAlgorithm]] = {name: _factory(name) for name in _WHERE}

DEFAULT_ALGORITHMS = ("resource-aware", "greedy", "block-round-robin", "static", "dynamic-layer", "edgeshard",
                      "galaxy")
"""What ``simulate`` runs unless told otherwise (exact is only for small scenarios)."""

RENAMED = {"round-robin": "block-round-robin"}
"""Old simulator names: ``round-robin`` is now only the runtime policy."""


def unknown_algorithm_message(names: list[str]) -> str:
    """Which names are unknown, the known ones, and a hint for a renamed one."""
    message = f"unknown algorithm(s) {', '.join(map(repr, names)) or '(none given)'}; choose from {', '.join(ALGORITHMS)}"
    hints = [f"the simulator's {RENAMED[n]!r} (was {n!r}; {n!r} is the runtime policy, controller/spread.py)"
             for n in names if n in RENAMED]
    return message + (f"; did you mean {', '.join(hints)}?" if hints else "")


def make_algorithm(name: str) -> PlacementAlgorithm:
    """A fresh instance of the algorithm called ``name``."""
    if name not in ALGORITHMS:
        raise ValueError(unknown_algorithm_message([name]))
    return ALGORITHMS[name]()
