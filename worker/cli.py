"""``edgeheads worker``: the worker daemon's command line.

The ``edgeheads`` dispatcher (edgeheads.headnode.cli) calls ``register``; everything this
imports is in the plain install (``pip install edgeheads``), which is what a board needs.
"""

from __future__ import annotations

import argparse
import asyncio

from edgeheads.common.cli import add_config_flags, byte_size, load_section


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``worker`` subcommand to the dispatcher's subparsers."""
    p = sub.add_parser("worker", help="run a worker daemon on this device")
    p.add_argument("--listen", default=None, help="HOST:PORT to serve on (default 0.0.0.0:50061)")
    p.add_argument("--controller", default=None, help="controller HOST:PORT (default 127.0.0.1:50051)")
    p.add_argument("--name", default=None, help="worker name (default: hostname-port)")
    p.add_argument("--memory-limit", type=byte_size, default=None, metavar="BYTES",
                   help="memory budget for blocks and caches, e.g. 2GiB")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--advertise", default=None, help="HOST:PORT others should dial, if not the listen address")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: every core)")
    p.add_argument("--relay-port", type=int, default=None,
                   help="TCP port for relay activations, on the listen host (default: any free port)")
    add_config_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT (the daemon stops gracefully on either)."""
    from edgeheads.worker.config import WorkerConfig
    from edgeheads.worker.daemon import run_worker

    cfg = load_section(args, WorkerConfig, "worker", {
        "listen": args.listen, "controller": args.controller, "name": args.name,
        "memory_limit_bytes": args.memory_limit, "device": args.device, "advertise": args.advertise,
        "torch_threads": args.threads, "relay_port": args.relay_port})
    asyncio.run(run_worker(cfg.worker, cfg.grpc, args.ready_file, cfg.security))
    return 0
