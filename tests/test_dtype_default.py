"""The default --dtype is ``auto``: a run that names no format says what it picked and runs
exactly that format; EDGEHEADS_HEADNODE__DTYPE (the head node config's ``dtype``) overrides it
for `generate --local` as it does for the daemons. (tests/conftest.py pins the variable to fp32
for every other test; here it is unset.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from edgeheads.headnode import dtype_choice
from edgeheads.headnode.loading import load_model
from edgeheads.headnode.local import LocalGenerator
from edgeheads.headnode.sampling import SamplingParams
from edgeheads.worker import kernel_probe, kernels

PINS = ",".join(f"{fmt}={order[0]}" for fmt, order in kernels.PREFERENCE.items())
PROMPT = "The capital of France is"


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != dtype_choice.ENV}
    return {**env, "OMP_WAIT_POLICY": "PASSIVE", kernel_probe.ENV: PINS, **extra}


def run_local(env: dict[str, str]) -> tuple[list[int], str]:
    out = subprocess.run([sys.executable, "-m", "edgeheads.headnode.cli", "generate", "--local", "--raw", "--json",
                          "--max-new-tokens", "6", PROMPT], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["token_ids"], out.stderr


def test_default_dtype_reads_the_head_node_variable(monkeypatch):
    monkeypatch.delenv(dtype_choice.ENV, raising=False)
    assert dtype_choice.default_dtype() == "auto"
    monkeypatch.setenv(dtype_choice.ENV, " BF16 ")
    assert dtype_choice.default_dtype() == "bf16"


def test_generate_without_dtype_runs_what_auto_picks_and_says_so(smollm2_gguf, monkeypatch):
    chosen = dtype_choice.auto_dtype("gguf", str(smollm2_gguf))
    assert chosen.startswith("q4:")  # the built-in model is a 4-bit GGUF
    ids, stderr = run_local(cli_env())
    assert f"--dtype auto: smollm2-135m runs as {chosen}" in stderr
    monkeypatch.setenv(kernel_probe.ENV, PINS)
    monkeypatch.setattr(kernel_probe, "_done", {})
    monkeypatch.setattr(kernels, "_chosen", {})
    want = LocalGenerator(load_model("smollm2-135m", chosen, progress=False)).generate(
        PROMPT, SamplingParams(max_new_tokens=6), chat=False).token_ids
    assert ids == want


def test_the_variable_overrides_auto(smollm2_gguf):
    """q4 with the compute dtype auto does not pick, read from the GGUF as stored (fp32 itself
    would load through transformers, ~30 s here)."""
    other = "q4:fp32" if dtype_choice.auto_dtype("gguf", str(smollm2_gguf)) == "q4:bf16" else "q4:bf16"
    ids, stderr = run_local(cli_env(**{dtype_choice.ENV: other}))
    assert "--dtype auto" not in stderr
    want = LocalGenerator(load_model("smollm2-135m", other, progress=False)).generate(
        PROMPT, SamplingParams(max_new_tokens=6), chat=False).token_ids
    assert ids == want


def test_a_bad_variable_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "edgeheads.headnode.cli", "generate", "--local", "--raw",
                          "--max-new-tokens", "2", PROMPT], capture_output=True, text=True, timeout=120,
                         env=cli_env(**{dtype_choice.ENV: "int3"}))
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "int3" in out.stderr

