"""A node's security settings (the ``security`` section every daemon and client reads) and
what they load into: mutual TLS files and the cluster token.

The section, like ``grpc``, is the same on every node of a cluster (only ``tls_name`` differs)::

    security:
      tls_dir: /etc/edgeheads/tls     # ca.crt, NAME.crt, NAME.key (edgeheads certs node NAME --out DIR)
      tls_name: worker-1
      token_file: /etc/edgeheads/token

Or in the environment: ``EDGEHEADS_SECURITY__TLS_DIR``, ``EDGEHEADS_SECURITY__TLS_NAME``,
``EDGEHEADS_SECURITY__TOKEN`` or ``EDGEHEADS_SECURITY__TOKEN_FILE``, ``EDGEHEADS_SECURITY__SERVER_NAME``.
Nothing set: plaintext and no token (loopback clusters, tests). docs/security.md has the recipes.

:func:`load_security` reads the files (the token file, the certificates, checked to belong
together) into a :class:`Security`; a daemon does it first thing and installs the result as the
process's identity (:func:`install_security`), which every channel, relay link and server of
the process then uses unless given another.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

import grpc
from pydantic import BeforeValidator, Field, SecretStr, ValidationInfo, field_validator

from edgeheads.common.certs import CertError, check_dns_name
from edgeheads.common.config import (ConfigError, DaemonConfig, GrpcSettings, Section, load_config,
                                     split_host_port)
from edgeheads.common.tls import TlsFiles, channel_credentials, load_tls_files, server_credentials, ssl_contexts

__all__ = ["ClientConfig", "PLAINTEXT", "Security", "SecuritySettings", "current_security", "exposure_warning",
           "install_security", "is_loopback", "load_client_config", "load_security", "use_security"]

MIN_TOKEN_CHARS = 16
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # a gRPC metadata value: printable ASCII; no spaces


def _blank_is_none(value: Any) -> Any:
    """An empty value (``EDGEHEADS_SECURITY__TOKEN=`` from a compose file's unset variable) is unset."""
    if isinstance(value, str) and not value.strip():
        return None
    if isinstance(value, SecretStr) and not value.get_secret_value().strip():
        return None
    return value


def check_token(token: str) -> str:
    """``token`` if it can be the cluster token, else ValueError saying why (never showing it)."""
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the token has {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
                         "(e.g. the output of: openssl rand -hex 32)")
    if not _TOKEN_CHARS.fullmatch(token):
        raise ValueError("the token must be printable ASCII without spaces (it travels as gRPC metadata); "
                         "e.g. the output of: openssl rand -hex 32")
    return token


_Unset = BeforeValidator(_blank_is_none)


class SecuritySettings(Section):
    """Mutual TLS and the cluster token. Every field unset: plaintext, no token."""

    # TLS: a directory holding ca.crt, TLS_NAME.crt and TLS_NAME.key, as `edgeheads certs node
    # TLS_NAME --out DIR` writes them. Both or neither.
    tls_dir: Annotated[Path | None, _Unset] = None
    tls_name: Annotated[str | None, _Unset, Field(validate_default=True)] = None
    # check servers' certificates against this name instead of the host dialed (for clusters
    # whose addresses are not known when the certificates are made: every certificate lists it)
    server_name: Annotated[str | None, _Unset, Field(validate_default=True)] = None
    # the cluster token, sent on every RPC and relay connection; or a file holding it (read at start)
    token: Annotated[SecretStr | None, _Unset] = None
    token_file: Annotated[Path | None, _Unset] = None

    @field_validator("tls_name")
    @classmethod
    def _tls_pair(cls, value: str | None, info: ValidationInfo) -> str | None:
        has_dir = info.data.get("tls_dir") is not None
        if value is None and has_dir:
            raise ValueError("tls_dir is set, so tls_name must be too: the node's files in tls_dir are "
                             "TLS_NAME.crt and TLS_NAME.key (beside ca.crt)")
        if value is not None and not has_dir:
            raise ValueError("tls_name is set without tls_dir, the directory holding ca.crt, "
                             f"{value}.crt and {value}.key")
        return None if value is None else _dns_name(value, "tls_name")

    @field_validator("server_name")
    @classmethod
    def _server_name_needs_tls(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("tls_dir") is None:
            raise ValueError("server_name only means something with TLS (tls_dir and tls_name)")
        return None if value is None else _dns_name(value, "server_name")

    @field_validator("token")
    @classmethod
    def _token_ok(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_token(value.get_secret_value())
        return value

    @field_validator("token_file")
    @classmethod
    def _one_token_source(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and info.data.get("token") is not None:
            raise ValueError("token and token_file are both set; give the token one way only")
        return value


def _dns_name(value: str, what: str) -> str:
    try:
        return check_dns_name(value, what)
    except CertError as err:
        raise ValueError(str(err)) from None


@dataclass(frozen=True)
class Security:
    """A node's loaded security: its TLS files (checked) or None, and the token or None.
    The token never shows in a repr."""

    tls: TlsFiles | None = None
    token: str | None = field(default=None, repr=False)
    server_name: str | None = None

    def __repr__(self) -> str:
        tls = f"{self.tls.cert} (CA {self.tls.ca})" if self.tls else "off"
        return f"Security(tls={tls}, token={'set' if self.token else 'none'})"

    @cached_property
    def server_credentials(self) -> grpc.ServerCredentials:
        assert self.tls is not None
        return server_credentials(self.tls)

    @cached_property
    def channel_credentials(self) -> grpc.ChannelCredentials:
        assert self.tls is not None
        return channel_credentials(self.tls)

    @cached_property
    def ssl_contexts(self) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        """(server, client) contexts for the relay port's raw TCP connections."""
        assert self.tls is not None
        return ssl_contexts(self.tls)

    def channel_options(self) -> list[tuple[str, str]]:
        """gRPC channel options this adds: the name servers' certificates are checked against."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.tls and self.server_name else []

    def relay_server_hostname(self, host: str) -> str:
        """The name the relay port's certificate must list when dialed at ``host``."""
        return self.server_name or host


PLAINTEXT = Security()


def read_token_file(path: Path) -> str:
    """The token in ``path`` (surrounding whitespace, e.g. a final newline, dropped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"security.token_file: {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"security.token_file: {path}: is a directory, not a file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"security.token_file: {path}: cannot be read ({getattr(err, 'strerror', None) or err})") \
            from None
    token = text.strip()
    if not token:
        raise ConfigError(f"security.token_file: {path}: the file is empty")
    try:
        return check_token(token)
    except ValueError as err:
        raise ConfigError(f"security.token_file: {path}: {err}") from None


def load_security(settings: SecuritySettings | None) -> Security:
    """Read what ``settings`` name: the token file, the TLS files (each checked, and the
    credentials built, so that a bad file fails here with its name). ConfigError otherwise."""
    settings = settings or SecuritySettings()
    token = settings.token.get_secret_value() if settings.token is not None else None
    if settings.token_file is not None:
        token = read_token_file(settings.token_file)
    tls = None
    if settings.tls_dir is not None:
        directory = Path(settings.tls_dir)
        if not directory.is_dir():
            raise ConfigError(f"security.tls_dir: {directory}: no such directory (make one with: edgeheads certs "
                              f"node {settings.tls_name} --ca-dir CA_DIR --out {directory} --host HOST)")
        tls = TlsFiles.in_directory(directory, settings.tls_name)
    security = Security(tls, token, settings.server_name)
    if tls is not None:
        try:
            load_tls_files(tls)
            security.server_credentials, security.channel_credentials, security.ssl_contexts  # noqa: B018
        except (CertError, ssl.SSLError, OSError) as err:
            raise ConfigError(f"security.tls_dir: {err}") from None
    return security


# ---------------------------------------------------------------- the process's identity

_process_security: Security = PLAINTEXT


def use_security(security: Security) -> None:
    """Make ``security`` what this process's channels, relay links and servers use by default."""
    global _process_security
    _process_security = security


def current_security() -> Security:
    """What :func:`use_security` installed; plaintext without a token until then."""
    return _process_security


def install_security(settings: SecuritySettings | None) -> Security:
    """A daemon's first step: load its settings (ConfigError on anything wrong) and install them."""
    security = load_security(settings)
    use_security(security)
    return security


# ---------------------------------------------------------------- clients and warnings

class ClientConfig(DaemonConfig):
    """What a client (``edgeheads health``, ``status``, ``generate --cluster``, the Python
    Client) reads: the ``grpc`` and ``security`` sections, from the same file and variables."""

    grpc: GrpcSettings = Field(default_factory=GrpcSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)


def load_client_config(path: str | os.PathLike[str] | None = None) -> tuple[GrpcSettings, Security]:
    """(grpc settings, loaded security) of a client: defaults < ``path`` < ``EDGEHEADS_*``."""
    config = load_config(ClientConfig, path)
    return config.grpc, load_security(config.security)


def is_loopback(host: str) -> bool:
    """Whether ``host`` can only be reached from this machine (127.0.0.0/8, ::1, localhost)."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(listen: str, security: Security, what: str = "") -> str | None:
    """The warning a daemon logs at start when it listens beyond loopback without TLS, else None."""
    if security.tls is not None or is_loopback(split_host_port(listen)[0]):
        return None
    token = ("the cluster token travels in clear text" if security.token else
             "and there is no cluster token")
    return (f"{what or 'serving'} on {listen} WITHOUT TLS: any host that reaches this port can join the cluster, "
            f"read activations and drive generations, {token}. Set security.tls_dir and security.tls_name "
            "(see docs/security.md), or listen on 127.0.0.1 only")
