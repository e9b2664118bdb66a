"""The deployment recipes for TLS and the token (docs/security.md) agree with the settings: the
compose override (deploy/compose.tls.yaml) and the systemd drop-in for the worker unit. Docker
is not needed: the override is checked against compose.yaml and the settings it sets are loaded."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgeheads.common.config import load_config
from edgeheads.common.security import SecuritySettings
from edgeheads.worker.config import WorkerConfig

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
PREFIX = "EDGEHEADS_SECURITY__"
VOLUME = re.compile(r"(\$\{[^}]*\}|[^:]+):(/[^:]+):ro")
DEFAULT = re.compile(r"\$\{\w+:-([^}]*)\}")


def test_the_compose_override_secures_every_service_of_the_base_file(monkeypatch):
    base = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    override = yaml.safe_load((DEPLOY / "compose.tls.yaml").read_text())
    assert override["version"] == base["version"]  # docker-compose 1.29 merges only files of one version
    assert set(override["services"]) == set(base["services"])
    for name, service in override["services"].items():
        env = service["environment"]
        assert {key.removeprefix(PREFIX).lower() for key in env} == {"tls_dir", "tls_name", "server_name",
                                                                     "token_file"}, name
        mounts = {VOLUME.fullmatch(v).group(2) for v in service["volumes"]}  # each read-only
        assert {env[f"{PREFIX}TLS_DIR"], env[f"{PREFIX}TOKEN_FILE"]} <= mounts, name
        for key, value in env.items():  # what a container's daemon would load, variables at their defaults
            monkeypatch.setenv(key, DEFAULT.sub(lambda m: m.group(1), value))
        settings = load_config(WorkerConfig).security
        assert settings.tls_name == "node" and settings.server_name == "edgeheads-node"
        assert isinstance(settings, SecuritySettings)


def test_the_systemd_drop_in_verifies_and_sets_the_security_fields(tmp_path, require_capability):
    require_capability("systemd-analyze", shutil.which("systemd-analyze") is not None)
    unit = (DEPLOY / "systemd" / "edgeheads-worker.service").read_text()
    unit = unit.replace("ExecStart=/opt/edgeheads/venv/bin/edgeheads ",
                        f"ExecStart={Path(sys.executable).parent / 'edgeheads'} ")
    drop_in = DEPLOY / "systemd" / "edgeheads-worker.service.d" / "tls.conf"
    (tmp_path / "edgeheads-worker.service").write_text(unit)
    (tmp_path / "edgeheads-worker.service.d").mkdir()
    for text, clean in ((drop_in.read_text(), True), (drop_in.read_text().replace("LoadCredential=", "LoadCredentia="),
                                                      False)):
        (tmp_path / "edgeheads-worker.service.d" / "tls.conf").write_text(text)
        proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "edgeheads-worker.service")],
                              capture_output=True, text=True, timeout=60)
        output = (proc.stdout + proc.stderr).strip()
        assert (proc.returncode == 0 and not output) if clean else "LoadCredentia" in output, output
    env = dict(line.removeprefix("Environment=").split("=", 1) for line in drop_in.read_text().splitlines()
               if line.startswith("Environment="))
    assert {key.removeprefix(PREFIX).lower() for key in env} <= set(SecuritySettings.model_fields)
    credentials = {line.split("=", 1)[1].split(":", 1)[0] for line in drop_in.read_text().splitlines()
                   if line.startswith("LoadCredential=")}
    name = env[f"{PREFIX}TLS_NAME"]
    assert credentials == {"ca.crt", f"{name}.crt", f"{name}.key", Path(env[f"{PREFIX}TOKEN_FILE"]).name}


@pytest.mark.parametrize("path", ["compose.tls.yaml", "systemd/worker.yaml"])
def test_recipes_are_valid_yaml(path):
    assert yaml.safe_load((DEPLOY / path).read_text()) is not None
