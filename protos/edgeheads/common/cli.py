"""What every daemon's command line shares: the ``--config`` and ``--ready-file`` flags, byte
sizes, a config built from file < ``EDGEHEADS_*`` environment < flags, the one-line user error,
and the message for a package that only an optional extra installs.

Each daemon owns its subcommand (``edgeheads.worker.cli``, ``edgeheads.controller.cli``, the head
node's in ``edgeheads.headnode``); the ``edgeheads`` dispatcher (``edgeheads.headnode.cli``)
assembles them. Nothing here imports more than the plain (worker) install has.
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType
from typing import Any, TypeVar

from edgeheads.common.config import ConfigError, DaemonConfig, load_config, parse_bytes

C = TypeVar("C", bound=DaemonConfig)


class CliError(Exception):
    """A user-facing error: printed as one line, exit status ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# top-level package -> the extra of ``pip install "edgeheads[EXTRA]"`` that brings it
EXTRAS: dict[str, str] = {
    "transformers": "headnode",
    "gguf": "headnode",
    "accelerate": "headnode",
    "tqdm": "headnode",
    "ortools": "solver",
    "matplotlib": "plots",
}


class MissingExtra(ModuleNotFoundError):
    """An optional package is not installed; the message names the extra that installs it."""


def missing_extra_message(err: ImportError) -> str | None:
    """The message for ``err`` when it is an optional package missing, else None."""
    if isinstance(err, MissingExtra):
        return str(err)
    root = (getattr(err, "name", None) or "").split(".")[0]
    extra = EXTRAS.get(root)
    if extra is None or not isinstance(err, ModuleNotFoundError):
        return None
    return (f"this needs the package {root!r}, which the plain (worker) install leaves out; "
            f"install it with: pip install \"edgeheads[{extra}]\" (or \"edgeheads[all]\")")


def import_extra(module: str, what: str = "") -> ModuleType:
    """``importlib.import_module(module)``; a missing optional package raises MissingExtra
    naming the extra, with ``what`` (e.g. ``"the exact algorithm"``) saying what needed it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        message = missing_extra_message(err)
        if message is None:
            raise
        raise MissingExtra(f"{what}: {message}" if what else message, name=err.name) from None


def byte_size(text: str) -> int:
    """argparse type for ``2GiB``, ``512MB``, ``1048576``."""
    try:
        return parse_bytes(text)
    except (ValueError, ConfigError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and the launchers' hidden ``--ready-file PATH``."""
    parser.add_argument("--config", default=None, help="YAML config file (see deploy/edgeheads.example.yaml)")
    parser.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)


def load_section(args: argparse.Namespace, config_cls: type[C], section: str, flags: dict[str, Any]) -> C:
    """The daemon's config: defaults < ``--config`` file < environment < ``flags`` (None = not given)."""
    return load_config(config_cls, args.config, {section: flags})
