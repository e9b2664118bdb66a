"""The config machinery every daemon shares; each daemon defines its own sections.

Sources, lowest precedence first (pydantic-settings layers them: its YAML source, wrapped for
clear errors in :class:`YamlFile`, its environment source and its init source for the flags):

1. the defaults below;
2. a YAML file (``--config FILE``), see ``deploy/edgeheads.example.yaml``;
3. ``EDGEHEADS_*`` environment variables, one per field, sections split by ``__``
   (``EDGEHEADS_WORKER__MEMORY_LIMIT_BYTES=2GiB``);
4. command-line flags, passed to :func:`load_config` as ``overrides``
   (``{"worker": {"listen": "0.0.0.0:50061"}}``); ``None`` means "flag not given".

Every field name carries its unit (``_bytes``, ``_seconds``). Byte fields take an integer or a
human size (``"512MiB"``, ``"2GB"``, ``"1.5GiB"``). Anything wrong -- a missing or unreadable
file, bad YAML, an unknown key, a wrong type -- raises :class:`ConfigError`, whose message names
where the bad value came from (file, environment variable or flags) and the field.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ByteSize, ConfigDict, Field, TypeAdapter,
                      ValidationError, model_validator)
from pydantic_settings import (BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict,
                               YamlConfigSettingsSource)
from pydantic_settings.exceptions import SettingsError

__all__ = [
    "Bytes", "ConfigError", "DaemonConfig", "DialAddress", "GrpcSettings", "ListenAddress", "Seconds", "Section",
    "load_config", "parse_bytes", "split_host_port",
]

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
ENV_PREFIX = "EDGEHEADS_"
ENV_DELIMITER = "__"
_GRPC_INT_MAX = (1 << 31) - 1  # gRPC channel arguments are C ints
WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}


class ConfigError(ValueError):
    """The configuration is unusable. One line per problem: ``SOURCE: section.field: what is wrong``,
    where SOURCE is the file path, ``environment variable EDGEHEADS_...`` or ``command-line flags``."""


# ---------------------------------------------------------------- value parsers

_BYTE_SIZE = TypeAdapter(ByteSize)
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")
_SIZE_HINT = "write e.g. 1048576, '512MiB', '2GB' or '1.5GiB' (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"


def parse_bytes(value: Any) -> int:
    """Turn ``1048576``, ``"512MiB"``, ``"2GB"``, ``"1.5GiB"`` into a byte count.

    pydantic's :class:`~pydantic.ByteSize` does the parsing: units are case-insensitive, B,
    KB/MB/GB/TB (powers of 1000) and KiB/MiB/GiB/TiB (powers of 1024); a fraction of a byte is
    rounded down. Before it, this rejects what ByteSize would let through by accident (booleans,
    trailing garbage such as ``"1.2.3MB"``) and words every error the same way.
    """
    if isinstance(value, bool):
        raise ValueError("expected a byte count such as 1048576 or '512MiB', got a boolean")
    if isinstance(value, (int, float)) and value < 0:
        raise ValueError(f"a byte count cannot be negative, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"a byte count must be a whole number, got {value!r}")
    match = _SIZE_RE.fullmatch(value) if isinstance(value, str) else None
    if isinstance(value, str) and (match is None or match.group(2).lower().endswith("bit")):
        raise ValueError(f"cannot read {value!r} as a size; {_SIZE_HINT}")  # ByteSize also takes bits
    if not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a byte count such as 1048576 or '512MiB', got {type(value).__name__}")
    try:
        return int(_BYTE_SIZE.validate_python(value))
    except ValidationError:
        raise ValueError(f"cannot read {value!r} as a size; {_SIZE_HINT}") from None


def split_host_port(address: str) -> tuple[str, int]:
    """Split ``"host:port"`` or ``"[ipv6]:port"`` into ``(host, port)``, validating both.

    The host of a bracketed IPv6 address is returned without brackets. Port 0 is accepted.
    """
    if not isinstance(address, str):
        raise ValueError(f"expected 'HOST:PORT', got {type(address).__name__}")
    host, sep, port_text = address.strip().rpartition(":")
    if not sep or not port_text:
        raise ValueError(f"{address!r} is not HOST:PORT (e.g. '0.0.0.0:50061' or '[::1]:50061')")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port in {address!r} must be a number from 0 to 65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError as err:
            raise ValueError(f"{host!r} in {address!r} is not an IPv6 address") from err
        return host[1:-1], int(port_text)
    if ":" in host:
        raise ValueError(f"IPv6 hosts must be bracketed: write '[{host}]:{port_text}'")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", host):
        raise ValueError(f"{address!r} has no valid host name or IP address before the ':'")
    return host, int(port_text)


def _listen_address(value: str) -> str:
    split_host_port(value)
    return value.strip()


def _dial_address(value: str) -> str:
    host, port = split_host_port(value)
    if port == 0:
        raise ValueError(f"{value!r}: port 0 means 'pick a free one' and only makes sense for listen addresses")
    if host in WILDCARD_HOSTS:
        raise ValueError(f"{value!r}: {host or 'an empty host'} is a listen-on-everything address; "
                         "give a host name or IP address that other machines can reach")
    return value.strip()


def lower_str(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


Bytes = Annotated[int, BeforeValidator(parse_bytes)]
"""An integer byte count that also accepts human sizes (``"512MiB"``)."""
ListenAddress = Annotated[str, AfterValidator(_listen_address)]
"""``HOST:PORT`` to bind; host ``0.0.0.0`` means every interface, port 0 means any free port."""
DialAddress = Annotated[str, AfterValidator(_dial_address)]
"""``HOST:PORT`` another process connects to; no port 0, no wildcard host."""
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_GrpcSeconds = Annotated[float, Field(gt=0, le=_GRPC_INT_MAX / 1000, allow_inf_nan=False)]


# ---------------------------------------------------------------- sections

class Section(BaseModel):
    """Common settings of every section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GrpcSettings(Section):
    """Transport settings shared by every daemon and the client."""

    max_message_bytes: Annotated[Bytes, Field(gt=0, le=_GRPC_INT_MAX)] = 64 * MiB
    keepalive_time_seconds: _GrpcSeconds = 30.0
    keepalive_timeout_seconds: _GrpcSeconds = 10.0
    chunk_bytes: Annotated[Bytes, Field(gt=0)] = 1 * MiB

    @model_validator(mode="after")
    def _chunks_fit(self) -> GrpcSettings:
        if self.chunk_bytes + 64 * KiB > self.max_message_bytes:
            raise ValueError(f"chunk_bytes ({self.chunk_bytes}) must be at least 64 KiB below "
                             f"max_message_bytes ({self.max_message_bytes}) so a chunk and its header fit in one message")
        return self

    def _common_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", int(self.keepalive_time_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_seconds * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
        ]

    def channel_options(self) -> list[tuple[str, int]]:
        """Options for ``grpc.insecure_channel(addr, options=...)``: explicit size limits and keepalive."""
        return self._common_options() + [("grpc.http2.max_pings_without_data", 0)]

    def server_options(self) -> list[tuple[str, int]]:
        """Options for ``grpc.server(..., options=...)``.

        Besides the size limits, the server accepts the clients' keepalive pings: by default gRPC
        servers treat pings more often than every 5 minutes as abuse and drop the connection.
        """
        min_ping_ms = max(1, int(self.keepalive_time_seconds * 1000) // 2)
        return self._common_options() + [("grpc.http2.min_ping_interval_without_data_ms", min_ping_ms),
                                         ("grpc.http2.max_ping_strikes", 0)]


# ---------------------------------------------------------------- the whole config

class DaemonConfig(BaseSettings):
    """Base of each daemon's config: its own sections as fields (``grpc``, ``security`` -- in
    edgeheads.common.security -- and the daemon's).

    Each daemon package defines its subclass next to its settings (``edgeheads.worker.config``,
    ``edgeheads.controller.config``, ``edgeheads.headnode.config``). ``DaemonConfig()`` reads
    defaults and ``EDGEHEADS_*``; use :func:`load_config` for the file and flags as well.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_DELIMITER,
                                      extra="forbid", validate_assignment=True)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        """Constructor arguments (the flags) > the environment > the YAML file that
        :func:`load_config` is reading, if any; no .env or secrets files."""
        yaml_file = _YAML_SOURCE.get()
        return (init_settings, env_settings) + ((yaml_file,) if yaml_file is not None else ())


SECTIONS = ("grpc", "security", "worker", "controller", "headnode")
"""Every section a config file may hold. One file can configure a whole cluster: each daemon
validates its own sections and ignores the others' (a misspelt section name is still an error)."""

C = TypeVar("C", bound=DaemonConfig)


class YamlFile(YamlConfigSettingsSource):
    """pydantic-settings' YAML source with clear errors: a missing or unreadable file, bad YAML
    (with its line and column) or a top level that is not a mapping raise :class:`ConfigError`
    naming the file. Sections of the other daemons are dropped (one file configures a whole
    cluster); a section whose keys are all commented out is empty."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | os.PathLike[str]) -> None:
        self.label = os.fspath(path)
        self.own_sections = set(settings_cls.model_fields)  # read during super().__init__
        if not Path(path).exists():  # the base class silently skips missing files and directories
            raise ConfigError(f"{self.label}: config file not found")
        if not Path(path).is_file():
            raise ConfigError(f"{self.label}: cannot read config file: not a regular file")
        super().__init__(settings_cls, yaml_file=Path(path), yaml_file_encoding="utf-8")

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            text = Path(file_path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{self.label}: cannot read config file: {err}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err)
            raise ConfigError(f"{self.label}: invalid YAML{where}: {problem}") from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigError(f"{self.label}: the top level must be a mapping of sections ({', '.join(SECTIONS)}), "
                              f"got {type(data).__name__}")
        return {key: ({} if value is None else value) for key, value in data.items()
                if key in self.own_sections or key not in SECTIONS}


_YAML_SOURCE: ContextVar[YamlFile | None] = ContextVar("edgeheads_yaml_source", default=None)
"""The file :func:`load_config` is reading, for DaemonConfig.settings_customise_sources (a
context variable, so that concurrent loads in threads or tasks do not see each other's file)."""


def _env_values(config_cls: type[DaemonConfig]) -> dict[str, Any]:
    try:
        return EnvSettingsSource(config_cls)()
    except SettingsError as err:  # a whole section given as bad JSON, e.g. EDGEHEADS_WORKER='{oops'
        match = re.search(r'field "(\w+)"', str(err))
        section = match.group(1) if match else "?"
        raise ConfigError(f"environment variable {ENV_PREFIX}{section.upper()}: {section}: "
                          "a whole section must be a JSON object; set one field instead, "
                          f"e.g. {ENV_PREFIX}{section.upper()}{ENV_DELIMITER}<FIELD>=...") from None


def _clean_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    if not overrides:
        return {}
    clean: dict[str, Any] = {}
    for section, values in overrides.items():
        if values is None:
            continue
        clean[section] = ({k: v for k, v in values.items() if v is not None}
                          if isinstance(values, Mapping) else values)
    return clean


def _env_name(section: str, field: str | None) -> str:
    nested = f"{ENV_PREFIX}{section}{ENV_DELIMITER}{field}".upper() if field else None
    environ = {name.upper() for name in os.environ}
    return nested if nested in environ else f"{ENV_PREFIX}{section}".upper()


def _origin(loc: tuple[Any, ...], layers: list[tuple[str, dict[str, Any]]]) -> str:
    """Which source supplied the value at ``loc``: the highest-precedence layer holding that key."""
    section = str(loc[0]) if loc else ""
    field = str(loc[1]) if len(loc) > 1 else None
    holders = []
    for label, data in layers:
        value = data.get(section)
        if section not in data:
            continue
        # A field error belongs to the layers that set that field (or replaced the whole section).
        if field is None or not isinstance(value, Mapping) or field in value:
            holders.append(label)
    if not holders:
        return "config"
    if field is not None:
        holders = holders[-1:]
    return " + ".join(f"environment variable {_env_name(section, field)}" if h == "environment" else h
                      for h in holders)


def _format_error(err: dict[str, Any], layers: list[tuple[str, dict[str, Any]]],
                  config_cls: type[DaemonConfig]) -> str:
    loc = tuple(str(part) for part in err["loc"])
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key" if len(loc) > 1 else f"unknown section (known: {', '.join(SECTIONS)})"
        if len(loc) > 1:
            model = config_cls.model_fields[loc[0]].annotation
            message += f" (known: {', '.join(model.model_fields)})"  # type: ignore[union-attr]
    elif err["type"] != "value_error" and "input" in err and not isinstance(err["input"], (dict, list)):
        message += f" (got {err['input']!r})"
    return f"{_origin(loc, layers)}: {'.'.join(loc) or '<top level>'}: {message}"


def load_config(config_cls: type[C], path: str | os.PathLike[str] | None = None,
                overrides: dict[str, dict[str, Any]] | None = None) -> C:
    """Build a daemon's config: defaults < YAML file ``path`` < ``EDGEHEADS_*`` env vars < ``overrides``.

    ``config_cls`` is the daemon's :class:`DaemonConfig` subclass. ``overrides`` holds the
    command-line flags by section, e.g. ``{"worker": {"listen": "..."}}``; ``None`` values (flags
    not given) are skipped. Sections of other daemons in the file are skipped; unknown sections
    are errors. Raises :class:`ConfigError` on any problem.
    """
    flags = _clean_overrides(overrides)
    yaml_file = YamlFile(config_cls, path) if path is not None else None
    token = _YAML_SOURCE.set(yaml_file)
    try:
        return config_cls(**flags)
    except ValidationError as err:
        layers = [(yaml_file.label, yaml_file.yaml_data)] if yaml_file is not None else []
        layers += [("environment", _env_values(config_cls)), ("command-line flags", flags)]
        raise ConfigError("\n".join(_format_error(e, layers, config_cls) for e in err.errors())) from None
    except SettingsError as err:  # the environment source cannot parse a variable
        _env_values(config_cls)  # raises the ConfigError that names it
        raise ConfigError(f"environment: {err}") from None
    except (TypeError, AttributeError) as err:  # e.g. an override dict with non-string keys
        raise ConfigError(f"command-line flags: {err}") from None
    finally:
        _YAML_SOURCE.reset(token)
