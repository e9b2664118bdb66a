"""The ``edgeheads`` command line: the dispatcher (the console script) and ``generate``.

Each daemon owns its subcommands: ``worker`` (edgeheads.worker.cli), ``controller`` and
``simulate`` (edgeheads.controller.cli), ``headnode`` and ``up`` (cli_daemons), ``status``
(cli_status), ``health`` (edgeheads.common.health_cli). This module assembles them. It imports
nothing at module level beyond the plain (worker) install, so ``edgeheads worker`` runs on a board
without transformers; a subcommand that needs an extra says which one.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from edgeheads.common.cli import CliError, missing_extra_message
from edgeheads.headnode.dtype_choice import DTYPE_HELP

__all__ = ["CliError", "build_parser", "main"]

log = logging.getLogger(__name__)


def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _float_in(low: float, high: float, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
            raise argparse.ArgumentTypeError(f"expected a number in {bound}, got {text}")
        return value
    return parse


def _dtype(text: str) -> str:
    from edgeheads.common.formats import FormatError, parse_dtype
    if text.strip().lower() == "auto":
        return "auto"
    try:
        parse_dtype(text)
    except FormatError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text.strip().lower()


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate text from PROMPT with the built-in default model or --model.")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", default=None,
                   help="built-in alias (default smollm2-135m), a .gguf file, a transformers directory or a hub id")
    p.add_argument("--dtype", default=None, type=_dtype, help=DTYPE_HELP)
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, help="at most this many new tokens (64)")
    p.add_argument("--temperature", type=_float_in(0.0, 100.0), default=0.0, help="0 means greedy (default)")
    p.add_argument("--top-k", type=_non_negative_int, default=0, help="keep the k most likely tokens; 0 = all")
    p.add_argument("--top-p", type=_float_in(0.0, 1.0, low_open=True), default=1.0, help="nucleus mass (1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap the prompt in the model's chat template (default when it has one)")
    chat.add_argument("--raw", dest="chat", action="store_false", help="never apply the chat template")
    p.add_argument("--local", action="store_true", help="run every block in this process (the reference path)")
    p.add_argument("--cluster", default=None, metavar="HOST:PORT",
                   help="a running head node; without it (and without --local) a local 3-worker cluster is started")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, timings) at the end")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="with --cluster: a config file whose security (TLS, token) and grpc sections to use "
                        "(EDGEHEADS_* variables are read either way)")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.local and args.cluster:
        raise CliError("--local and --cluster exclude each other", 2)
    if args.config and not args.cluster:
        raise CliError("--config goes with --cluster (a local cluster reads EDGEHEADS_* variables)", 2)
    if args.local:
        result = _generate_local(args)
    else:
        result = _generate_remote(args)
    if args.json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        print(f"[{len(result.token_ids)} tokens, {result.finish_reason}, "
              f"{result.to_json()['decode_tokens_per_second']} tokens/s decode]", file=sys.stderr)
    return 0


def _generate_local(args: argparse.Namespace):
    from edgeheads.headnode.loading import DEFAULT_MODEL, load_model
    from edgeheads.headnode.local import LocalGenerator, set_threads
    from edgeheads.headnode.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    set_threads()
    generator = LocalGenerator(load_model(args.model or DEFAULT_MODEL, args.dtype, progress=True),
                               own_weights=True)
    results = []
    for event in generator.stream(args.prompt, params, chat=args.chat, on_finish=results.append):
        if not args.json:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    return results[0]


def _generate_remote(args: argparse.Namespace):
    from edgeheads.headnode.client import Client, ClientError
    from edgeheads.headnode.embedded import LaunchError, LocalCluster

    cluster = None
    address = args.cluster
    if address is None:
        print("starting a local cluster: controller, head node and 3 workers on 127.0.0.1", file=sys.stderr)
        cluster = LocalCluster(args.model, dtype=args.dtype)
        try:
            address = cluster.start()
        except LaunchError as err:
            raise CliError(f"local cluster failed to start: {err}") from None
    elif args.model:
        raise CliError("--model names the model of a local run; a running cluster serves its own model", 2)
    elif args.dtype:
        raise CliError("--dtype sets the format of a local run; a running cluster serves its own", 2)
    def show(text: str) -> None:
        if not args.json:
            sys.stdout.write(text)
            sys.stdout.flush()

    try:
        if cluster is not None:
            _say_placement(cluster.addresses["controller"])
        with Client(address, config=args.config) as client:
            return client.generate_full(args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                        args.seed, args.chat, on_text=show)
    except ClientError as err:
        raise CliError(f"head node {address}: {err}") from None
    finally:
        if cluster is not None:
            cluster.stop()


def _say_placement(controller: str) -> None:
    """One line on stderr: the policy the local cluster's controller placed the blocks with, and
    how many each worker holds (`edgeheads status` shows more)."""
    from edgeheads.headnode.cli_status import gather
    try:
        status = gather(controller, None)
    except CliError as err:
        print(f"placement: unknown ({err})", file=sys.stderr)
        return
    held = status["decisions"][-1]["blocks_per_worker"] if status["decisions"] else {}
    workers = sorted(w["name"] for w in status["workers"])
    shares = ", ".join(f"{name} {held.get(name, 0)}" for name in workers)
    print(f"placement by the {status['policy']} policy, blocks per worker: {shares}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeheads", description="LLM inference split into per-head blocks "
                                     "across edge devices.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from edgeheads.common import certs_cli, health_cli
    from edgeheads.controller import cli as controller_cli
    from edgeheads.headnode import cli_daemons, cli_status
    from edgeheads.worker import cli as worker_cli

    _add_generate(sub)
    controller_cli.register(sub)  # controller, simulate
    worker_cli.register(sub)
    cli_daemons.register(sub)  # headnode, up
    cli_status.register(sub)
    health_cli.register(sub)
    certs_cli.register(sub)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """The exceptions printed as one line. The head node's (model loading) when its extra is
    installed; a worker-only install has the config and OS errors."""
    try:
        from edgeheads.headnode.errors import USER_ERRORS
    except ImportError:
        from edgeheads.common.config import ConfigError

        return (ConfigError, ValueError, OSError)
    return USER_ERRORS


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except CliError as err:
        print(f"edgeheads: error: {err}", file=sys.stderr)
        return err.code
    except ModuleNotFoundError as err:
        message = missing_extra_message(err)
        if message is None:
            raise
        print(f"edgeheads {args.command}: error: {message}", file=sys.stderr)
        return 1
    except Exception as err:
        if not isinstance(err, _user_errors()):
            raise
        print(f"edgeheads: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgeheads: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
