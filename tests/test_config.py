"""The daemons' config: defaults < YAML file < EDGEHEADS_* env vars < flags, and clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import functools

from edgeheads.common import config as common_config
from edgeheads.common.config import ConfigError, GrpcSettings, parse_bytes, split_host_port
from edgeheads.controller.config import ControllerSettings
from edgeheads.headnode.config import ClusterConfig as EdgeheadsConfig
from edgeheads.headnode.config import HeadnodeSettings
from edgeheads.worker.config import WorkerConfig, WorkerSettings

load_config = functools.partial(common_config.load_config, EdgeheadsConfig)

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "edgeheads.example.yaml"
MiB, GiB = 1 << 20, 1 << 30


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No EDGEHEADS_* variable of the machine running the tests leaks in."""
    for name in list(os.environ):
        if name.upper().startswith("EDGEHEADS_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "edgeheads.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- defaults and the example

def test_defaults():
    cfg = load_config()
    assert cfg.worker.listen == "0.0.0.0:50061"
    assert cfg.worker.advertise is None
    assert cfg.worker.controller == "127.0.0.1:50051"
    assert cfg.worker.name is None and cfg.worker.memory_limit_bytes is None
    assert cfg.worker.device == "cpu"
    assert cfg.worker.telemetry_period_seconds == 1.0
    assert cfg.controller.listen == "0.0.0.0:50051"
    assert cfg.controller.heartbeat_timeout_seconds == 5.0
    assert cfg.controller.policy == "resource-aware"
    assert cfg.headnode.listen == "0.0.0.0:50050"
    assert cfg.headnode.controller == "127.0.0.1:50051"
    assert cfg.headnode.model == "smollm2-135m" and cfg.headnode.dtype == "auto"
    assert cfg.headnode.min_workers == 1 and cfg.headnode.worker_wait_seconds == 60
    assert cfg.grpc.max_message_bytes == 64 * MiB  # explicit, not gRPC's 4 MiB
    assert cfg.grpc.chunk_bytes == 1 * MiB
    assert (cfg.grpc.keepalive_time_seconds, cfg.grpc.keepalive_timeout_seconds) == (30, 10)


def test_grpc_options_set_explicit_limits():
    client = dict(GrpcSettings(max_message_bytes="128MiB").channel_options())
    server = dict(GrpcSettings().server_options())
    assert client["grpc.max_send_message_length"] == client["grpc.max_receive_message_length"] == 128 * MiB
    assert server["grpc.max_receive_message_length"] == 64 * MiB
    assert client["grpc.keepalive_time_ms"] == 30_000 and client["grpc.keepalive_timeout_ms"] == 10_000
    # the server must tolerate the client's keepalive pings, or it drops the connection
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= client["grpc.keepalive_time_ms"]


def test_example_file_loads_and_documents_the_defaults():
    cfg = load_config(EXAMPLE)
    assert cfg == load_config(), "deploy/edgeheads.example.yaml must show the built-in defaults"


def test_example_file_mentions_every_field():
    text = EXAMPLE.read_text(encoding="utf-8")
    for section in (WorkerSettings, ControllerSettings, HeadnodeSettings, GrpcSettings):
        for field in section.model_fields:
            assert f"\n  {field}:" in text, f"{field} is not in the example config"


def test_an_empty_file_and_empty_sections_are_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == load_config()
    # every key of a section commented out: YAML gives None for the section
    assert load_config(write(tmp_path, "worker:\n  # listen: x\ngrpc:\n")) == load_config()


# ---------------------------------------------------------------- precedence

def test_file_overrides_defaults(tmp_path):
    path = write(tmp_path, "worker:\n  listen: 127.0.0.1:6000\n  name: pi-kitchen\nheadnode:\n  min_workers: 3\n")
    cfg = load_config(path)
    assert cfg.worker.listen == "127.0.0.1:6000"
    assert cfg.worker.name == "pi-kitchen"
    assert cfg.headnode.min_workers == 3
    assert cfg.worker.controller == "127.0.0.1:50051"  # untouched fields keep their defaults


def test_env_overrides_file(tmp_path, monkeypatch):
    path = write(tmp_path, "worker:\n  listen: 127.0.0.1:6000\n  memory_limit_bytes: 1GiB\n  name: from-file\n")
    monkeypatch.setenv("EDGEHEADS_WORKER__MEMORY_LIMIT_BYTES", "2GiB")
    monkeypatch.setenv("EDGEHEADS_CONTROLLER__HEARTBEAT_TIMEOUT_SECONDS", "7.5")
    cfg = load_config(path)
    assert cfg.worker.memory_limit_bytes == 2 * GiB
    assert cfg.controller.heartbeat_timeout_seconds == 7.5
    assert cfg.worker.listen == "127.0.0.1:6000"  # env sets only its own fields
    assert cfg.worker.name == "from-file"


def test_env_names_are_case_insensitive_and_constructor_reads_env(monkeypatch):
    monkeypatch.setenv("edgeheads_headnode__model", "HuggingFaceTB/SmolLM2-135M-Instruct")
    monkeypatch.setenv("EDGEHEADS_WORKER__DEVICE", "CUDA")
    assert load_config().headnode.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert EdgeheadsConfig().worker.device == "cuda"


def test_overrides_beat_env_and_file(tmp_path, monkeypatch):
    path = write(tmp_path, "worker:\n  listen: 127.0.0.1:6000\n  controller: 10.0.0.1:1\n  device: cpu\n")
    monkeypatch.setenv("EDGEHEADS_WORKER__LISTEN", "127.0.0.1:7000")
    monkeypatch.setenv("EDGEHEADS_WORKER__CONTROLLER", "10.0.0.2:2")
    cfg = load_config(path, {"worker": {"listen": "127.0.0.1:8000", "controller": None, "name": None},
                             "headnode": None})
    assert cfg.worker.listen == "127.0.0.1:8000"  # flag > env > file
    assert cfg.worker.controller == "10.0.0.2:2"  # None (flag not given) does not clobber env
    assert cfg.worker.name is None
    assert cfg.worker.device == "cpu"


def test_overrides_without_file_or_env():
    cfg = load_config(overrides={"worker": {"memory_limit_bytes": "512MiB", "device": "cuda"}})
    assert cfg.worker.memory_limit_bytes == 512 * MiB and cfg.worker.device == "cuda"


# ---------------------------------------------------------------- human byte sizes

@pytest.mark.parametrize("text, expected", [
    (1048576, MiB), ("1048576", MiB), ("512MiB", 512 * MiB), ("2GB", 2_000_000_000),
    ("1.5GiB", 3 * GiB // 2), ("64 kib", 64 * 1024), ("3mb", 3_000_000), ("7B", 7), (2.0, 2), ("0.5KiB", 512),
    ("1.1TB", 1_100_000_000_000), (" 5 MiB ", 5 * MiB),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["2XB", "GiB", "1.2.3MB", "-1MiB", -5, True, 1.5, [1], "", "1kbit", "1e3", None])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ValueError):
        parse_bytes(bad)


def test_byte_fields_accept_human_sizes_from_every_source(tmp_path, monkeypatch):
    path = write(tmp_path, "grpc:\n  max_message_bytes: 32MiB\n  chunk_bytes: 256KiB\n")
    monkeypatch.setenv("EDGEHEADS_WORKER__MEMORY_LIMIT_BYTES", "1.5GiB")
    cfg = load_config(path)
    assert cfg.grpc.max_message_bytes == 32 * MiB and cfg.grpc.chunk_bytes == 256 * 1024
    assert cfg.worker.memory_limit_bytes == 3 * GiB // 2


# ---------------------------------------------------------------- addresses

@pytest.mark.parametrize("addr, expected", [
    ("0.0.0.0:50061", ("0.0.0.0", 50061)), ("localhost:0", ("localhost", 0)),
    ("pi-1.local:65535", ("pi-1.local", 65535)), ("[::1]:80", ("::1", 80)),
])
def test_split_host_port(addr, expected):
    assert split_host_port(addr) == expected


@pytest.mark.parametrize("bad", ["50061", "host:", ":50061", "host:65536", "host:-1", "host:port",
                                 "::1:80", "[nope]:80", "a b:1"])
def test_bad_listen_addresses(bad):
    with pytest.raises(ConfigError, match=r"command-line flags: worker\.listen: "):
        load_config(overrides={"worker": {"listen": bad}})


def test_listen_port_zero_allowed_but_not_for_addresses_to_dial():
    assert load_config(overrides={"controller": {"listen": "127.0.0.1:0"}}).controller.listen == "127.0.0.1:0"
    with pytest.raises(ConfigError, match=r"worker\.controller: .*port 0"):
        load_config(overrides={"worker": {"controller": "127.0.0.1:0"}})
    with pytest.raises(ConfigError, match=r"headnode\.controller: .*0\.0\.0\.0"):
        load_config(overrides={"headnode": {"controller": "0.0.0.0:50051"}})


def test_advertise_address():
    assert WorkerSettings(advertise="10.1.2.3:9").advertise_address() == "10.1.2.3:9"
    assert WorkerSettings(listen="192.168.1.5:7000").advertise_address() == "192.168.1.5:7000"
    # wildcard listen with a local controller: loopback; port 0 replaced by the bound port
    assert WorkerSettings(listen="0.0.0.0:0").advertise_address(bound_port=4321) == "127.0.0.1:4321"
    with pytest.raises(ValueError, match="bound_port"):
        WorkerSettings(listen="0.0.0.0:0").advertise_address()


# ---------------------------------------------------------------- errors

def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"^{path}: config file not found$"):
        load_config(path)


def test_bad_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "worker:\n  listen: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: invalid YAML at line ")


@pytest.mark.parametrize("text, kind", [("- worker\n- grpc\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_top_level_must_be_a_mapping(tmp_path, text, kind):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^{path}: the top level must be a mapping .*got {kind}$"):
        load_config(path)


def test_unknown_key_in_file(tmp_path):
    path = write(tmp_path, "worker:\n  memory_limit: 2GiB\n")
    with pytest.raises(ConfigError, match=rf"^{path}: worker\.memory_limit: unknown key \(known: .*memory_limit_bytes"):
        load_config(path)


def test_unknown_section_in_file(tmp_path):
    path = write(tmp_path, "workers:\n  listen: 127.0.0.1:1\n")
    with pytest.raises(ConfigError, match=rf"^{path}: workers: unknown section"):
        load_config(path)


def test_wrong_types_in_file(tmp_path):
    path = write(tmp_path, "worker:\n  memory_limit_bytes: lots\n  device: tpu\nheadnode:\n  min_workers: two\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith(f"{path}: worker.memory_limit_bytes: cannot read 'lots' as a size")
    assert lines[1].startswith(f"{path}: worker.device: ") and "'tpu'" in lines[1]
    assert lines[2].startswith(f"{path}: headnode.min_workers: ") and "'two'" in lines[2]


def test_section_that_is_not_a_mapping(tmp_path):
    path = write(tmp_path, "grpc: 5\n")
    with pytest.raises(ConfigError, match=rf"^{path}: grpc: "):
        load_config(path)


def test_bad_env_value_names_the_variable(tmp_path, monkeypatch):
    path = write(tmp_path, "worker:\n  memory_limit_bytes: 1GiB\n")
    monkeypatch.setenv("EDGEHEADS_WORKER__MEMORY_LIMIT_BYTES", "2 gigs")
    with pytest.raises(ConfigError, match=r"^environment variable EDGEHEADS_WORKER__MEMORY_LIMIT_BYTES: "
                                          r"worker\.memory_limit_bytes: cannot read '2 gigs'"):
        load_config(path)


def test_unknown_env_key_in_a_known_section(monkeypatch):
    monkeypatch.setenv("EDGEHEADS_WORKER__LISTN", "127.0.0.1:1")
    with pytest.raises(ConfigError, match=r"EDGEHEADS_WORKER__LISTN: worker\.listn: unknown key"):
        load_config()


def test_bad_json_section_in_env(monkeypatch):
    monkeypatch.setenv("EDGEHEADS_WORKER", "{not json")
    with pytest.raises(ConfigError, match=r"^environment variable EDGEHEADS_WORKER: worker: .*JSON"):
        load_config()


def test_bad_override(monkeypatch):
    with pytest.raises(ConfigError, match=r"^command-line flags: headnode\.min_workers: .*\(got 0\)"):
        load_config(overrides={"headnode": {"min_workers": 0}})
    with pytest.raises(ConfigError, match=r"^command-line flags: headnode\.modle: unknown key"):
        load_config(overrides={"headnode": {"modle": "x"}})


def test_error_blames_the_source_that_won(tmp_path, monkeypatch):
    # the file's bad value is replaced by a good env value: no error
    path = write(tmp_path, "controller:\n  heartbeat_timeout_seconds: -1\n")
    monkeypatch.setenv("EDGEHEADS_CONTROLLER__HEARTBEAT_TIMEOUT_SECONDS", "3")
    assert load_config(path).controller.heartbeat_timeout_seconds == 3
    # a bad flag is blamed on the flags, not on the file that set the same field
    with pytest.raises(ConfigError, match=r"^command-line flags: controller\.heartbeat_timeout_seconds"):
        load_config(path, {"controller": {"heartbeat_timeout_seconds": 0}})


def test_chunks_must_fit_in_a_message(tmp_path, monkeypatch):
    path = write(tmp_path, "grpc:\n  chunk_bytes: 32MiB\n")
    assert load_config(path).grpc.chunk_bytes == 32 * MiB
    monkeypatch.setenv("EDGEHEADS_GRPC__MAX_MESSAGE_BYTES", "16MiB")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path} + environment variable EDGEHEADS_GRPC: grpc: chunk_bytes")
    assert "max_message_bytes" in message


@pytest.mark.parametrize("section, field, value", [
    ("grpc", "max_message_bytes", "4GiB"),  # gRPC limits are C ints
    ("grpc", "max_message_bytes", 0),
    ("grpc", "keepalive_time_seconds", 0),
    ("worker", "telemetry_period_seconds", float("inf")),
    ("worker", "memory_limit_bytes", 0),
    ("worker", "name", ""),
    ("controller", "policy", "Not A Policy"),
    ("headnode", "worker_wait_seconds", -1),
    ("headnode", "model", 7),
])
def test_out_of_range_values(section, field, value):
    with pytest.raises(ConfigError, match=rf"^command-line flags: {section}\.{field}: "):
        load_config(overrides={section: {field: value}})


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_a_daemon_reads_only_its_own_sections(tmp_path):
    """One file configures the cluster: the worker ignores the other daemons' sections,
    but a misspelt section is still an error."""
    path = write(tmp_path, "worker:\n  listen: 127.0.0.1:7001\nheadnode:\n  model: x\n")
    cfg = common_config.load_config(WorkerConfig, path)
    assert cfg.worker.listen == "127.0.0.1:7001"
    assert not hasattr(cfg, "headnode")
    with pytest.raises(ConfigError, match="wroker"):
        common_config.load_config(WorkerConfig, write(tmp_path, "wroker:\n  listen: 127.0.0.1:7001\n", "b.yaml"))


def test_the_file_is_read_only_by_the_load_that_names_it(tmp_path):
    """The YAML layer is pydantic-settings' source, handed to one load_config call only."""
    path = write(tmp_path, "worker:\n  name: from-file\n")
    assert load_config(path).worker.name == "from-file"
    assert EdgeheadsConfig().worker.name is None and load_config().worker.name is None


def test_a_directory_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: cannot read config file"):
        load_config(tmp_path)
