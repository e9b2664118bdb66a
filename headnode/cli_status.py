"""``edgeheads status``: what the controller decided and why, and what the head node did.

    edgeheads status --controller HOST:PORT [--headnode HOST:PORT] [--json] [--config FILE]

Against a cluster with mutual TLS or a token it uses the daemons' ``security`` settings
(``EDGEHEADS_SECURITY__*`` variables, or the ``security`` section of ``--config FILE``).
"""

from __future__ import annotations

import argparse
import json
import time

import grpc

from edgeheads.common.channels import open_sync_channel
from edgeheads.common.config import GrpcSettings
from edgeheads.common.security import Security, load_client_config
from edgeheads.v1 import controller_pb2, controller_pb2_grpc


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show the cluster: workers, placement decisions and their reasons, migrations")
    p.add_argument("--controller", default="127.0.0.1:50051", help="controller HOST:PORT (default 127.0.0.1:50051)")
    p.add_argument("--headnode", default=None, help="head node HOST:PORT, for migrations and step timing")
    p.add_argument("--decisions", type=int, default=10, help="how many recent decisions to show (10)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="config file whose security (TLS, token) and grpc sections to use; EDGEHEADS_* variables "
                        "too")
    p.set_defaults(func=_cmd_status)


def gather(controller: str, headnode: str | None, security: Security | None = None,
           grpc_settings: GrpcSettings | None = None) -> dict:
    """``security`` and ``grpc_settings`` None: from the EDGEHEADS_* variables."""
    from edgeheads.common.cli import CliError
    if security is None or grpc_settings is None:
        loaded_grpc, loaded_security = load_client_config()
        security = loaded_security if security is None else security
        grpc_settings = loaded_grpc if grpc_settings is None else grpc_settings
    try:
        with open_sync_channel(controller, grpc_settings, security) as channel:
            reply = controller_pb2_grpc.ControllerStub(channel).Status(controller_pb2.ControllerStatusRequest(),
                                                                       timeout=10)
    except grpc.RpcError as err:
        raise CliError(f"controller {controller}: {err.code().name}: {err.details()}") from None
    out = {
        "model": reply.model, "policy": reply.policy, "epoch": reply.epoch, "error": reply.error,
        "tokens_since_plan": reply.tokens_since_plan, "replan_every_tokens": reply.replan_every_tokens,
        "workers": [{"name": w.name, "address": w.address, "memory_available_bytes": w.memory_available_bytes,
                     "memory_used_bytes": w.memory_used_bytes, "compute_flops": w.compute_flops,
                     "memory_limit_bytes": w.memory_limit_bytes, "memory_limit_source": w.memory_limit_source,
                     "seconds_since_heartbeat": w.seconds_since_heartbeat, "cpu_percent": w.cpu_percent,
                     "load_1m": w.load_1m, "temperature_celsius": w.temperature_celsius or None,
                     "throttling": controller_pb2.Throttling.Name(w.throttling),
                     "links": {link.peer: {"bandwidth_bytes_per_second": link.bandwidth_bytes_per_second,
                                           "latency_seconds": link.latency_seconds} for link in w.links}}
                    for w in reply.workers],
        "decisions": [{"epoch": d.epoch, "unix_time": d.unix_time, "reason": d.reason, "policy": d.policy,
                       "blocks_moved": d.blocks_moved, "blocks_per_worker": dict(d.blocks_per_worker),
                       "predicted_token_seconds": d.predicted_token_seconds or None} for d in reply.decisions],
    }
    if headnode:
        from edgeheads.headnode.client import Client, ClientError
        try:
            with Client(headnode, security=security, grpc_settings=grpc_settings) as client:
                head = client.status()
        except ClientError as err:
            raise CliError(f"head node {headnode}: {err}") from None
        head.pop("placement", None)
        out["headnode"] = head
    return out


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.0f} MiB"


def _limit(worker: dict) -> str:
    """The memory ceiling and its source, e.g. "1,024 MiB cgroup"."""
    if not worker["memory_limit_bytes"]:
        return "-"
    return f"{_mib(worker['memory_limit_bytes'])} {worker['memory_limit_source']}"


def render(status: dict, decisions: int) -> str:
    lines = [f"model {status['model'] or '(none yet)'}, policy {status['policy']}, epoch {status['epoch']}, "
             f"re-plan every {status['replan_every_tokens'] or '-'} tokens ({status['tokens_since_plan']} since the last)"]
    if status["error"]:
        lines.append(f"LAST RE-PLAN FAILED: {status['error']}")
    lines += ["", f"{'worker':16s} {'address':22s} {'used':>11s} {'budget':>11s} {'limit':>18s} {'GFLOP/s':>8s} {'cpu':>5s} "
                  f"{'load':>5s} {'temp':>6s} {'heard':>7s}"]
    for w in status["workers"]:
        temp = f"{w['temperature_celsius']:.0f}C" if w["temperature_celsius"] else "-"
        throttled = " THROTTLED" if w["throttling"] == "THROTTLING_ACTIVE" else ""
        lines.append(f"{w['name']:16s} {w['address']:22s} {_mib(w['memory_used_bytes']):>11s} "
                     f"{_mib(w['memory_available_bytes']):>11s} {_limit(w):>18s} {w['compute_flops'] / 1e9:8.1f} "
                     f"{w['cpu_percent']:4.0f}% {w['load_1m']:5.2f} {temp:>6s} {w['seconds_since_heartbeat']:6.1f}s"
                     f"{throttled}")
        for peer, link in sorted(w["links"].items()):
            lines.append(f"{'':18s}-> {peer}: {link['bandwidth_bytes_per_second'] * 8 / 1e6:,.0f} Mbit/s, "
                         f"{link['latency_seconds'] * 1e3:.2f} ms")
    lines += ["", "recent decisions (newest last):"]
    for d in status["decisions"][-decisions:]:
        when = time.strftime("%H:%M:%S", time.localtime(d["unix_time"]))
        predicted = f"{d['predicted_token_seconds'] * 1e3:.1f} ms/token" if d["predicted_token_seconds"] else "n/a"
        spread = ", ".join(f"{k} {v}" for k, v in sorted(d["blocks_per_worker"].items()))
        lines.append(f"  {when} epoch {d['epoch']:>4}  {d['blocks_moved']:>3} moved  predicted {predicted:>15s}  "
                     f"[{spread}]  because: {d['reason']}")
    head = status.get("headnode")
    if head:
        lines += ["", f"head node: epoch {head['epoch']} ({head['dataflow']} dataflow), "
                      f"{head['active_sessions']} active sessions, "
                      f"{head['migrations']} migrations ({_mib(head['migrated_bytes'])} moved, longest hold "
                      f"{head['max_stall_seconds'] * 1e3:.0f} ms), {head['migration_failures']} abandoned, "
                      f"{head['phases_per_token']} phases/token, mean {head['mean_phase_seconds'] * 1e6:.0f} us each"]
        if head["last_migration_error"]:
            lines.append(f"  last abandoned migration: {head['last_migration_error']}")
    return "\n".join(lines)


def _cmd_status(args: argparse.Namespace) -> int:
    grpc_settings, security = load_client_config(args.config)
    status = gather(args.controller, args.headnode, security, grpc_settings)
    print(json.dumps(status, indent=2) if args.json else render(status, args.decisions))
    return 0
