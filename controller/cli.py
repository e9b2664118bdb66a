"""``edgeheads controller`` and ``edgeheads simulate``: the controller's command line.

The ``edgeheads`` dispatcher (edgeheads.headnode.cli) calls ``register``. Both run from the
plain install; the ``exact`` algorithm needs the ``solver`` extra and ``simulate --plot`` the
``plots`` extra, and a missing one is named in the error.
"""

from __future__ import annotations

import argparse
import asyncio

from edgeheads.common.cli import add_config_flags, load_section
from edgeheads.controller import simulate_cli


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``controller`` and ``simulate`` subcommands to the dispatcher's subparsers."""
    p = sub.add_parser("controller", help="run the controller daemon")
    p.add_argument("--listen", default=None, help="HOST:PORT to serve on (default 0.0.0.0:50051)")
    p.add_argument("--policy", default=None,
                   help="placement policy: resource-aware (default: the paper's head-level algorithm, "
                        "re-planned as load changes), dynamic-layer (layer ranges), spread, round-robin, single, or "
                        "another `edgeheads simulate` algorithm such as edgeshard")
    add_config_flags(p)
    p.set_defaults(func=run_controller_command)
    simulate_cli.register(sub)


def run_controller_command(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT (the daemon stops gracefully on either)."""
    from edgeheads.controller.config import ControllerConfig
    from edgeheads.controller.daemon import run_controller

    cfg = load_section(args, ControllerConfig, "controller", {"listen": args.listen, "policy": args.policy})
    asyncio.run(run_controller(cfg.controller, cfg.grpc, args.ready_file, cfg.security))
    return 0
