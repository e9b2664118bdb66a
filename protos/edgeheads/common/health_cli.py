"""``edgeheads health HOST:PORT``: a ``grpc.health.v1`` check of any edgeheads daemon.

Exit 0 when the daemon answers SERVING, 1 otherwise (NOT_SERVING, unreachable, timed out), with
one line saying which. Docker's ``HEALTHCHECK``, compose healthchecks and scripts call it; it needs
only the plain (worker) install. Against a daemon with mutual TLS or a cluster token it uses the
same ``security`` settings as the daemons (``EDGEHEADS_SECURITY__*``, or ``--config FILE``): the
health service is not exempt from the token.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_TIMEOUT_SECONDS = 5.0


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``health`` subcommand to the dispatcher's subparsers."""
    p = sub.add_parser("health", help="check that a daemon serves (grpc.health.v1; exit 0 or 1)",
                       description="Ask the daemon at HOST:PORT for its grpc.health.v1 status: exit 0 when it "
                                   "is SERVING, 1 otherwise (not serving, unreachable, timed out).")
    p.add_argument("address", metavar="HOST:PORT", help="the daemon's gRPC address")
    p.add_argument("--service", default="",
                   help="the service to ask about, e.g. edgeheads.v1.Worker (default: the whole server)")
    p.add_argument("--timeout", type=_positive_seconds, default=DEFAULT_TIMEOUT_SECONDS, metavar="SECONDS",
                   help=f"give up after this long (default {DEFAULT_TIMEOUT_SECONDS:g})")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="config file whose security (TLS, token) and grpc sections to use; EDGEHEADS_* variables "
                        "too")
    p.set_defaults(func=run)


def check(address: str, service: str = "", timeout: float = DEFAULT_TIMEOUT_SECONDS,
          security=None, grpc_settings=None) -> tuple[bool, str]:
    """(serving, one-line description) for the daemon at ``address``; ``security`` (an
    edgeheads.common.security.Security) None: plaintext without a token."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from edgeheads.common.channels import open_sync_channel
    from edgeheads.common.security import PLAINTEXT

    what = f"{address} ({service})" if service else address
    try:
        with open_sync_channel(address, grpc_settings, PLAINTEXT if security is None else security) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as err:
        code = err.code() if hasattr(err, "code") else None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return False, f"{what}: no answer within {timeout:g} s"
        if code == grpc.StatusCode.NOT_FOUND:
            return False, f"{what}: unknown service"
        if code == grpc.StatusCode.UNAVAILABLE:
            return False, f"{what}: unreachable ({_first_line(err)})"
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return False, f"{what}: refused ({_first_line(err)})"
        return False, f"{what}: {code.name if code else 'error'} ({_first_line(err)})"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{what}: {status}"


def _first_line(err: Exception) -> str:
    details = err.details() if hasattr(err, "details") else str(err)
    return (details or "").strip().splitlines()[0] if (details or "").strip() else "no details"


def run(args: argparse.Namespace) -> int:
    from edgeheads.common.security import load_client_config

    grpc_settings, security = load_client_config(args.config)
    serving, message = check(args.address, args.service, args.timeout, security, grpc_settings)
    print(message, file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1
