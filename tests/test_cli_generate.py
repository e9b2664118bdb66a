"""`edgeheads generate` as a user runs it: a real subprocess, real model files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from tiny_configs import TINY_CONFIGS


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeheads.headnode.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("flags,message", [
    (["--max-new-tokens", "0"], "--max-new-tokens: expected a positive integer"),
    (["--max-new-tokens", "ten"], "--max-new-tokens: expected a positive integer"),
    (["--temperature", "-1"], "--temperature: expected a number in"),
    (["--top-p", "1.5"], "--top-p: expected a number in"),
    (["--top-k", "-3"], "--top-k: expected an integer >= 0"),
    (["--chat", "--raw"], "not allowed with argument"),
])
def test_bad_flag_values_exit_2_with_a_message(flags, message):
    proc = run_cli("generate", "hi", *flags)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("model,message", [
    ("no-such-alias", "not found"),
    ("/no/such/dir", "not found"),
])
def test_bad_model_exits_1_with_a_message(model, message):
    proc = run_cli("generate", "hi", "--model", model, "--local")
    assert proc.returncode == 1
    assert proc.stderr.startswith("edgeheads: error:") and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_json_output_on_a_local_transformers_dir_matches_transformers(save_tiny_model, tiny_tokenizer):
    path = save_tiny_model(TINY_CONFIGS["gpt2"], "gpt2-cli", seed=3)
    proc = run_cli("generate", "Once upon a time", "--model", str(path), "--max-new-tokens", "12", "--raw",
                   "--local", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # stdout is exactly one JSON object; progress went to stderr
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tiny_tokenizer("Once upon a time").input_ids
    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    if ref and ref[-1] == eos:
        ref = ref[:-1]  # transformers returns the EOS token; edgeheads reports generated text tokens only
    assert out["token_ids"] == ref
    assert out["text"] == tiny_tokenizer.decode(ref, skip_special_tokens=True)
    assert out["finish_reason"] in ("eos", "length")


@pytest.mark.slow
def test_default_model_generates_text_and_streams_it(smollm2_gguf):
    proc = run_cli("generate", "What is the capital of France?", "--max-new-tokens", "16", "--local")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "tokens/s decode" in proc.stderr


@pytest.mark.slow
def test_seeded_sampling_is_repeatable_through_the_cli(smollm2_gguf):
    args = ("generate", "Name a colour.", "--model", str(smollm2_gguf), "--temperature", "0.9", "--top-k", "40",
            "--top-p", "0.95", "--seed", "11", "--max-new-tokens", "10", "--local", "--json")
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["token_ids"] == json.loads(second.stdout)["token_ids"]
