"""``edgeheads controller|worker|headnode|up``: the daemons and the local cluster."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any, TypeVar

from edgeheads.common.config import ConfigError, DaemonConfig, load_config, parse_bytes

C = TypeVar("C", bound=DaemonConfig)


def _bytes(text: str) -> int:
    try:
        return parse_bytes(text)
    except (ValueError, ConfigError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _config(args: argparse.Namespace, config_cls: type[C], section: str, overrides: dict[str, Any]) -> C:
    return load_config(config_cls, args.config, {section: overrides})


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config file (see deploy/edgeheads.example.yaml)")
    p.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)


def add_daemon_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("controller", help="run the controller daemon")
    p.add_argument("--listen", default=None, help="HOST:PORT to serve on (default 0.0.0.0:50051)")
    p.add_argument("--policy", default=None, help="placement policy: spread (default), round-robin or single")
    _common(p)
    p.set_defaults(func=_cmd_controller)

    p = sub.add_parser("worker", help="run a worker daemon on this device")
    p.add_argument("--listen", default=None, help="HOST:PORT to serve on (default 0.0.0.0:50061)")
    p.add_argument("--controller", default=None, help="controller HOST:PORT (default 127.0.0.1:50051)")
    p.add_argument("--name", default=None, help="worker name (default: hostname-port)")
    p.add_argument("--memory-limit", type=_bytes, default=None, metavar="BYTES",
                   help="memory budget for blocks and caches, e.g. 2GiB")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--advertise", default=None, help="HOST:PORT others should dial, if not the listen address")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: every core)")
    p.add_argument("--relay-port", type=int, default=None,
                   help="TCP port for relay activations, on the listen host (default: any free port)")
    _common(p)
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("headnode", help="run the head node daemon")
    p.add_argument("--listen", default=None, help="HOST:PORT to serve on (default 0.0.0.0:50050)")
    p.add_argument("--controller", default=None, help="controller HOST:PORT (default 127.0.0.1:50051)")
    p.add_argument("--model", default=None, help="model to serve (default smollm2-135m)")
    p.add_argument("--min-workers", type=int, default=None, help="wait for this many workers before placing")
    p.add_argument("--dataflow", choices=["relay", "head"], default=None,
                   help="relay (default): workers pass activations to each other; head: every phase "
                        "goes through the head node")
    p.add_argument("--relay-transport", choices=["tcp", "grpc"], default=None,
                   help="how relay activations travel: tcp (default) frames on each worker's relay port; "
                        "grpc streams, when only the workers' gRPC ports are reachable")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _common(p)
    p.set_defaults(func=_cmd_headnode)

    p = sub.add_parser("up", help="start a local cluster (controller, head node, workers) until Ctrl-C")
    p.add_argument("--model", default=None, help="model to serve (default smollm2-135m)")
    p.add_argument("--workers", type=int, default=3, help="number of worker processes (3)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind every daemon to")
    p.set_defaults(func=_cmd_up)


def _cmd_controller(args: argparse.Namespace) -> int:
    from edgeheads.controller.config import ControllerConfig
    from edgeheads.controller.daemon import run_controller

    cfg = _config(args, ControllerConfig, "controller", {"listen": args.listen, "policy": args.policy})
    asyncio.run(run_controller(cfg.controller, cfg.grpc, args.ready_file))
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from edgeheads.worker.config import WorkerConfig
    from edgeheads.worker.daemon import run_worker

    cfg = _config(args, WorkerConfig, "worker", {"listen": args.listen, "controller": args.controller, "name": args.name,
                                   "memory_limit_bytes": args.memory_limit, "device": args.device,
                                   "advertise": args.advertise, "torch_threads": args.threads,
                                   "relay_port": args.relay_port})
    asyncio.run(run_worker(cfg.worker, cfg.grpc, args.ready_file))
    return 0


def _cmd_headnode(args: argparse.Namespace) -> int:
    from edgeheads.headnode.config import HeadnodeConfig
    from edgeheads.headnode.daemon import run_headnode
    from edgeheads.headnode.local import set_threads

    cfg = _config(args, HeadnodeConfig, "headnode", {"listen": args.listen, "controller": args.controller, "model": args.model,
                                     "min_workers": args.min_workers, "dataflow": args.dataflow,
                                     "relay_transport": args.relay_transport})
    set_threads()
    asyncio.run(run_headnode(cfg.headnode, cfg.grpc, args.ready_file, progress=not args.quiet))
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from edgeheads.headnode.embedded import LocalCluster

    if args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    with LocalCluster(args.model, workers=args.workers, host=args.host) as cluster:
        print(f"edgeheads cluster up: head node at {cluster.address}, controller at "
              f"{cluster.addresses['controller']}, {args.workers} workers (logs in {cluster.dir})", flush=True)
        print(f'try: edgeheads generate "Hello" --cluster {cluster.address}     (Ctrl-C stops)', flush=True)
        try:
            while all(p.poll() is None for p in cluster.procs.values()):
                time.sleep(0.5)
            dead = [n for n, p in cluster.procs.items() if p.poll() is not None]
            print(f"edgeheads: {', '.join(dead)} exited; stopping the cluster", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("stopping the cluster", file=sys.stderr)
    return 0
