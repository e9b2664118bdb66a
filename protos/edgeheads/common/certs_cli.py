"""``edgeheads certs``: make the cluster's mutual-TLS certificates (edgeheads.common.certs).

``edgeheads certs ca --out DIR`` makes the CA (``DIR/ca.key``, ``DIR/ca.crt``); ``edgeheads
certs node NAME --ca-dir DIR --out DIR2 --host H ...`` makes a node's ``NAME.key`` and
``NAME.crt`` and copies ``ca.crt`` beside them, so ``DIR2`` is all the node needs; the CA key
never leaves ``DIR``. It needs only the plain (worker) install.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeheads.common.certs import CertError, check_dns_name, make_ca, make_node_cert, write_bundle
from edgeheads.common.cli import CliError

DEFAULT_CA_NAME = "edgeheads cluster CA"
DEFAULT_CA_DAYS = 3650
DEFAULT_NODE_DAYS = 365


def _positive_days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of days, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of days, got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``certs`` subcommand (``certs ca``, ``certs node``) to the dispatcher's subparsers."""
    p = sub.add_parser("certs", help="make the cluster's mutual-TLS certificates (a CA, then one per node)",
                       description="Make a private CA, then a certificate for each node signed by it.")
    what = p.add_subparsers(dest="certs_command", required=True, metavar="WHAT")
    ca = what.add_parser("ca", help="make the CA: OUT/ca.key and OUT/ca.crt",
                         description="Make a self-signed CA: OUT/ca.key (keep it off the nodes) and OUT/ca.crt.")
    ca.add_argument("--out", required=True, type=Path, metavar="DIR", help="where to write ca.key and ca.crt")
    ca.add_argument("--name", default=DEFAULT_CA_NAME, help=f"the CA's common name ({DEFAULT_CA_NAME!r})")
    ca.add_argument("--days", type=_positive_days, default=DEFAULT_CA_DAYS, help=f"valid this long ({DEFAULT_CA_DAYS})")
    ca.add_argument("--force", action="store_true", help="replace existing files")
    ca.set_defaults(func=run_ca)
    node = what.add_parser("node", help="make a node's certificate: OUT/NAME.key, OUT/NAME.crt, OUT/ca.crt",
                           description="Make the key and certificate of node NAME, signed by the CA in --ca-dir, "
                                       "and copy the CA certificate beside them (never the CA key).")
    node.add_argument("name", metavar="NAME", help="the node's name (a DNS name; always in the certificate)")
    node.add_argument("--ca-dir", required=True, type=Path, metavar="DIR", help="holds ca.key and ca.crt")
    node.add_argument("--out", required=True, type=Path, metavar="DIR", help="where to write the node's files")
    node.add_argument("--host", action="append", default=[], metavar="H",
                      help="an IP address or DNS name the node is dialed by (repeat for more)")
    node.add_argument("--days", type=_positive_days, default=DEFAULT_NODE_DAYS,
                      help=f"valid this long, at most until the CA expires ({DEFAULT_NODE_DAYS})")
    node.add_argument("--force", action="store_true", help="replace existing files")
    node.set_defaults(func=run_node)


def run_ca(args: argparse.Namespace) -> int:
    key_pem, cert_pem = make_ca(args.name, args.days)
    _print_written(_write(args.out, "ca", key_pem, cert_pem, None, args.force))
    return 0


def run_node(args: argparse.Namespace) -> int:
    try:
        check_dns_name(args.name, "node name")
    except CertError as err:
        raise CliError(str(err), 2) from None
    if args.name == "ca":
        raise CliError("a node cannot be named 'ca' (its files would clash with the CA's)", 2)
    ca_key_pem, ca_cert_pem = _read_ca(args.ca_dir)
    try:
        key_pem, cert_pem = make_node_cert(ca_key_pem, ca_cert_pem, args.name, args.host, args.days)
    except CertError as err:
        raise CliError(str(err)) from None
    _print_written(_write(args.out, args.name, key_pem, cert_pem, ca_cert_pem, args.force))
    if (args.out / "ca.key").exists():
        print(f"note: {args.out} also holds the CA key; give the node only ca.crt, {args.name}.crt and "
              f"{args.name}.key", file=sys.stderr)
    return 0


def _read_ca(ca_dir: Path) -> tuple[bytes, bytes]:
    paths = ca_dir / "ca.key", ca_dir / "ca.crt"
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise CliError(f"no CA in {ca_dir}: {', '.join(missing)} missing (make one with: edgeheads certs ca "
                       f"--out {ca_dir})")
    try:
        return paths[0].read_bytes(), paths[1].read_bytes()
    except OSError as err:
        raise CliError(f"{err.filename}: cannot be read ({err.strerror})") from None


def _write(out: Path, stem: str, key_pem: bytes, cert_pem: bytes, ca_cert_pem: bytes | None,
           force: bool) -> list[Path]:
    try:
        return write_bundle(out, stem, key_pem, cert_pem, ca_cert_pem=ca_cert_pem, force=force)
    except FileExistsError as err:
        raise CliError(f"{err.filename}: already exists (--force replaces it)") from None
    except OSError as err:
        raise CliError(f"cannot write into {out}: {err.strerror or err}") from None


def _print_written(paths: list[Path]) -> None:
    for path in paths:
        print(f"wrote {path}")
