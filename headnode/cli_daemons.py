"""``edgeheads headnode|up``: the head node daemon and a whole local cluster.

The other daemons' subcommands live with them (edgeheads.worker.cli, edgeheads.controller.cli).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from edgeheads.common.cli import CliError, add_config_flags, load_section
from edgeheads.common.config import ConfigError
from edgeheads.headnode.dtype_choice import DTYPE_HELP


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``headnode`` and ``up`` to the dispatcher's subparsers."""
    p = sub.add_parser("headnode", help="run the head node daemon")
    p.add_argument("--listen", default=None, help="HOST:PORT to serve on (default 0.0.0.0:50050)")
    p.add_argument("--controller", default=None, help="controller HOST:PORT (default 127.0.0.1:50051)")
    p.add_argument("--model", default=None, help="model to serve (default smollm2-135m)")
    p.add_argument("--dtype", default=None, help=DTYPE_HELP)
    p.add_argument("--min-workers", type=int, default=None, help="wait for this many workers before placing")
    p.add_argument("--dataflow", choices=["relay", "head"], default=None,
                   help="relay (default): workers pass activations to each other; head: every phase "
                        "goes through the head node")
    p.add_argument("--relay-transport", choices=["tcp", "grpc"], default=None,
                   help="how relay activations travel: tcp (default) frames on each worker's relay port; "
                        "grpc streams, when only the workers' gRPC ports are reachable")
    p.add_argument("--http-listen", default=None, metavar="HOST:PORT|off",
                   help="where to serve the OpenAI-compatible HTTP API (default 0.0.0.0:8080); off: nowhere")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_flags(p)
    p.set_defaults(func=_cmd_headnode)

    p = sub.add_parser("up", help="start a local cluster (controller, head node, workers) until Ctrl-C or SIGTERM")
    p.add_argument("--model", default=None, help="model to serve (default smollm2-135m)")
    p.add_argument("--dtype", default=None, help=DTYPE_HELP)
    p.add_argument("--workers", type=int, default=3, help="number of worker processes (3)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind every daemon to")
    p.set_defaults(func=_cmd_up)


def _cmd_headnode(args: argparse.Namespace) -> int:
    from edgeheads.headnode.config import HeadnodeConfig
    from edgeheads.headnode.daemon import run_headnode
    from edgeheads.headnode.local import set_threads

    cfg = load_section(args, HeadnodeConfig, "headnode", {
        "listen": args.listen, "controller": args.controller, "model": args.model, "dtype": args.dtype,
        "min_workers": args.min_workers, "dataflow": args.dataflow, "relay_transport": args.relay_transport,
        "http_listen": args.http_listen})
    set_threads()
    asyncio.run(run_headnode(cfg.headnode, cfg.grpc, args.ready_file, progress=not args.quiet,
                             security_settings=cfg.security))
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    """Run the cluster until SIGINT, SIGTERM or SIGHUP (Ctrl-C, ``kill``, ``docker stop``, systemd),
    or until the controller or the head node exits; every daemon is stopped before returning,
    whichever it was. A worker that exits is reported, and the cluster goes on without it (the
    head node recovers its sessions on the others)."""
    from edgeheads.headnode.embedded import LaunchError, LocalCluster, Stopped, exit_description, stop_signals_raise

    if args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    with stop_signals_raise():  # the first signal raises here; later ones wait for the stop below
        cluster = LocalCluster(args.model, workers=args.workers, host=args.host, dtype=args.dtype)
        try:
            cluster.start()
            print(f"edgeheads cluster up: head node at {cluster.address}, controller at "
                  f"{cluster.addresses['controller']}, {args.workers} workers (logs in {cluster.dir})", flush=True)
            print(f'try: edgeheads generate "Hello" --cluster {cluster.address}     (Ctrl-C stops)', flush=True)
            if cluster.http_address:
                print(f"OpenAI-compatible HTTP API at http://{cluster.http_address}/v1", flush=True)
            while True:
                time.sleep(0.5)
                exits = cluster.new_exits()
                for name, code in sorted(exits.items()):
                    if name.startswith("worker-"):
                        left = sum(1 for n, p in cluster.procs.items() if n.startswith("worker-") and p.poll() is None)
                        print(f"edgeheads: {name} exited ({exit_description(code)}); the cluster goes on with "
                              f"{left} workers (its log: {cluster.dir / f'{name}.log'})", file=sys.stderr, flush=True)
                essential = sorted(n for n in exits if not n.startswith("worker-"))
                if essential:
                    print(f"edgeheads: {', '.join(f'{n} exited ({exit_description(exits[n])})' for n in essential)}; "
                          "stopping the cluster", file=sys.stderr, flush=True)
                    return 1
        except LaunchError as err:
            raise CliError(f"local cluster failed to start: {err}") from None
        except (KeyboardInterrupt, Stopped) as stop:
            why = "interrupted" if isinstance(stop, KeyboardInterrupt) else str(stop)
            print(f"edgeheads: {why}; stopping the cluster", file=sys.stderr)
            return 0
        finally:
            cluster.stop()
