"""The ``security`` section: read like ``grpc`` from file < environment < flags, the token never
shown, and every bad setting a clear error at start (the daemons exit non-zero before serving)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from edgeheads.common import config as common_config
from edgeheads.common.auth import RefusalLog, peer_host, token_matches
from edgeheads.common.certs import make_ca, make_node_cert, write_bundle
from edgeheads.common.config import ConfigError
from edgeheads.common.security import (ClientConfig, SecuritySettings, exposure_warning, is_loopback,
                                       load_client_config, load_security, Security)
from edgeheads.controller.config import ControllerConfig
from edgeheads.headnode.cli import main
from edgeheads.worker.config import WorkerConfig

TOKEN = "s3cret-token-0123456789abcdef"
EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "edgeheads.example.yaml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.upper().startswith("EDGEHEADS_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A directory with ca.crt, node.crt/node.key and other.crt/other.key (other: the key swapped)."""
    out = tmp_path_factory.mktemp("certs")
    ca_key, ca_cert = make_ca("test CA", 30)
    for name in ("node", "other"):
        key, cert = make_node_cert(ca_key, ca_cert, name, ["127.0.0.1"], 30)
        write_bundle(out, name, key, cert, ca_cert_pem=ca_cert)
    return out


def write(tmp_path: Path, text: str, name: str = "edgeheads.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_nothing_set_is_plaintext_without_a_token():
    security = load_security(common_config.load_config(WorkerConfig).security)
    assert security.tls is None and security.token is None


def test_every_daemon_and_the_client_read_the_section_from_file_and_environment(tmp_path, monkeypatch, certs):
    path = write(tmp_path, f"security:\n  tls_dir: {certs}\n  tls_name: node\n")
    monkeypatch.setenv("EDGEHEADS_SECURITY__TOKEN", TOKEN)
    for config_cls in (WorkerConfig, ControllerConfig, ClientConfig):
        section = common_config.load_config(config_cls, path).security
        assert (section.tls_dir, section.tls_name) == (certs, "node")
        assert section.token.get_secret_value() == TOKEN
    grpc_settings, security = load_client_config(path)
    assert security.tls.cert == certs / "node.crt" and security.token == TOKEN


def test_the_token_never_shows(monkeypatch):
    monkeypatch.setenv("EDGEHEADS_SECURITY__TOKEN", TOKEN)
    cfg = common_config.load_config(WorkerConfig)
    security = load_security(cfg.security)
    for text in (repr(cfg), str(cfg), cfg.model_dump_json(), repr(cfg.security), repr(security), str(security)):
        assert TOKEN not in text, text
    assert "token=set" in repr(security)


def test_a_token_file_is_read_at_start(tmp_path):
    path = write(tmp_path, TOKEN + "\n", "token")
    assert load_security(SecuritySettings(token_file=path)).token == TOKEN


@pytest.mark.parametrize("text,message", [
    ("", "the file is empty"),
    ("short\n", "use at least 16"),
    ("has a space in the middle of it\n", "printable ASCII without spaces"),
])
def test_a_bad_token_file_names_the_file(tmp_path, text, message):
    path = write(tmp_path, text, "token")
    with pytest.raises(ConfigError, match=rf"^security\.token_file: {path}: .*{message}"):
        load_security(SecuritySettings(token_file=path))


def test_a_missing_token_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match=rf"security\.token_file: {tmp_path / 'nope'}: no such file"):
        load_security(SecuritySettings(token_file=tmp_path / "nope"))


def test_token_and_token_file_together_are_an_error_naming_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEHEADS_SECURITY__TOKEN_FILE", str(tmp_path / "t"))
    path = write(tmp_path, f"security:\n  token: {TOKEN}\n")
    with pytest.raises(ConfigError) as err:
        common_config.load_config(WorkerConfig, path)
    message = str(err.value)
    assert "EDGEHEADS_SECURITY__TOKEN_FILE: security.token_file: token and token_file are both set" in message
    assert TOKEN not in message


@pytest.mark.parametrize("token,message", [("short", "at least 16"), ("a b c d e f g h i j", "without spaces")])
def test_a_weak_or_unsendable_token_is_refused_without_showing_it(monkeypatch, token, message):
    monkeypatch.setenv("EDGEHEADS_SECURITY__TOKEN", token)
    where = "environment variable EDGEHEADS_SECURITY__TOKEN: security.token: "
    with pytest.raises(ConfigError, match=f"{where}.*{message}") as err:
        common_config.load_config(WorkerConfig)
    assert repr(token) not in str(err.value)


def test_an_empty_variable_is_unset(monkeypatch):
    """compose passes ``${EDGEHEADS_TOKEN:-}`` as an empty string when the variable is unset."""
    monkeypatch.setenv("EDGEHEADS_SECURITY__TOKEN", "")
    monkeypatch.setenv("EDGEHEADS_SECURITY__TLS_DIR", " ")
    assert common_config.load_config(WorkerConfig).security == SecuritySettings()


@pytest.mark.parametrize("overrides,message", [
    ({"tls_dir": "/etc/edgeheads/tls"}, "tls_dir is set, so tls_name must be too"),
    ({"tls_name": "worker-1"}, "tls_name is set without tls_dir"),
    ({"server_name": "edgeheads"}, "server_name only means something with TLS"),
    ({"tls_dir": "/x", "tls_name": "not a name"}, "neither an IP address nor a DNS name"),
])
def test_incomplete_tls_settings_are_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        common_config.load_config(WorkerConfig, overrides={"security": overrides})


def test_tls_files_are_checked_at_load(tmp_path, certs):
    assert load_security(SecuritySettings(tls_dir=certs, tls_name="node")).tls.key == certs / "node.key"
    with pytest.raises(ConfigError, match=rf"security\.tls_dir: {tmp_path / 'none'}: no such directory"):
        load_security(SecuritySettings(tls_dir=tmp_path / "none", tls_name="node"))
    with pytest.raises(ConfigError, match=r"security\.tls_dir: .*nobody\.crt: no such file"):
        load_security(SecuritySettings(tls_dir=certs, tls_name="nobody"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name, source in (("ca.crt", "ca.crt"), ("node.crt", "node.crt"), ("node.key", "other.key")):
        (mixed / name).write_bytes((certs / source).read_bytes())
    with pytest.raises(ConfigError, match="the private key does not belong to the certificate"):
        load_security(SecuritySettings(tls_dir=mixed, tls_name="node"))


@pytest.mark.parametrize("argv,env,message", [
    (["controller", "--listen", "127.0.0.1:0"], {"EDGEHEADS_SECURITY__TLS_DIR": "{missing}",
                                                 "EDGEHEADS_SECURITY__TLS_NAME": "node"}, "no such directory"),
    (["worker", "--listen", "127.0.0.1:0"], {"EDGEHEADS_SECURITY__TOKEN": TOKEN,
                                             "EDGEHEADS_SECURITY__TOKEN_FILE": "/run/secrets/t"}, "both set"),
    (["headnode", "--listen", "127.0.0.1:0", "--model", "/no/such/model"],
     {"EDGEHEADS_SECURITY__TOKEN_FILE": "{missing}"}, "no such file"),
    (["health", "127.0.0.1:1"], {"EDGEHEADS_SECURITY__TLS_NAME": "node"}, "tls_name is set without tls_dir"),
])
def test_daemons_and_commands_exit_non_zero_with_one_line_on_bad_security(tmp_path, monkeypatch, capsys, argv, env,
                                                                         message):
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(missing=tmp_path / "missing"))
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("edgeheads: error: ") and message in err, err
    assert "Traceback" not in err


def test_generate_takes_a_config_only_for_a_running_cluster(tmp_path, capsys):
    assert main(["generate", "x", "--config", str(write(tmp_path, ""))]) == 2
    assert "--config goes with --cluster" in capsys.readouterr().err


def test_the_example_file_documents_every_field():
    text = EXAMPLE.read_text(encoding="utf-8")
    assert "\nsecurity:\n" in text
    for field in SecuritySettings.model_fields:
        assert f"\n  {field}:" in text, f"{field} is not in the example config"


@pytest.mark.parametrize("listen,tls,token,warned", [
    ("127.0.0.1:50051", False, False, False), ("[::1]:50051", False, False, False),
    ("localhost:50051", False, False, False), ("0.0.0.0:50051", False, False, True),
    ("192.168.1.20:50051", False, True, True), ("0.0.0.0:50051", True, True, False),
])
def test_a_non_loopback_listener_without_tls_is_warned_about(certs, listen, tls, token, warned):
    security = Security(load_security(SecuritySettings(tls_dir=certs, tls_name="node")).tls if tls else None,
                        TOKEN if token else None)
    warning = exposure_warning(listen, security)
    assert (warning is not None) == warned
    if warned:
        assert "WITHOUT TLS" in warning and listen in warning
        assert ("clear text" in warning) == token


def test_loopback_hosts():
    assert is_loopback("127.0.0.1") and is_loopback("127.1.2.3") and is_loopback("::1") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("raspberrypi.local")


def test_tokens_compare_whole():
    assert token_matches(TOKEN, TOKEN) and token_matches(TOKEN.encode(), TOKEN)
    assert not token_matches(None, TOKEN) and not token_matches(TOKEN[:-1], TOKEN) and not token_matches("", TOKEN)


def test_peer_hosts():
    assert peer_host("ipv4:10.0.0.5:41234") == "10.0.0.5"
    assert peer_host("ipv6:[::1]:41234") == "::1"
    assert peer_host(("10.0.0.6", 5)) == "10.0.0.6"


def test_refusals_are_logged_once_per_reason_and_host_per_interval(caplog):
    now = [0.0]
    refusals = RefusalLog(logging.getLogger("test.refusals"), interval_seconds=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "test.refusals"):
        assert refusals.refused("no cluster token", "ipv4:10.0.0.5:1", "an RPC")
        assert not refusals.refused("no cluster token", "ipv4:10.0.0.5:2", "an RPC")  # same host, within 10 s
        assert refusals.refused("a wrong cluster token", "ipv4:10.0.0.5:3", "an RPC")  # another reason
        assert refusals.refused("no cluster token", "ipv4:10.0.0.6:1", "an RPC")  # another host
        now[0] = 11
        assert refusals.refused("no cluster token", "ipv4:10.0.0.5:4", "an RPC")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "refused an RPC from ipv4:10.0.0.5:1: no cluster token"
    assert lines[-1] == ("refused an RPC from ipv4:10.0.0.5:4: no cluster token "
                         "(1 more from this host since the last report)")
    assert len(lines) == 4
