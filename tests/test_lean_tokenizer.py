"""LeanTokenizer (headnode/lean_tokenizer.py) gives transformers' results on the same saved
tokenizer: ids, text, chat prompts, EOS; and the direct GGUF path loads and generates without
importing transformers at all (the memory it saves is measured by benchmarks/formats.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import jinja2
import pytest
from transformers import AutoTokenizer

from edgeheads.headnode import model_cache
from edgeheads.headnode.lean_tokenizer import LeanTokenizer, compile_template
from edgeheads.headnode.loading import ModelSource, gguf_tokenizer

TEXTS = ["Hello, world!", "  leading spaces and trailing  ", "naïve café — 東京 🚀", "line one\nline two\n\n\tindent",
         "<|im_start|>user\nliteral special tokens<|im_end|>", "don't can't we're I'm", "", "1234567890 3.14159"]
CHATS = [
    [{"role": "user", "content": "Write a haiku about edge devices."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "user", "content": "quotes \" and <html> & {{ braces }}", "name": None}],
]


@pytest.fixture(scope="module")
def pair(smollm2_gguf):
    """(LeanTokenizer, transformers' tokenizer) over the directory the head node keeps for SmolLM2."""
    lean = gguf_tokenizer(ModelSource("gguf", str(smollm2_gguf), "smollm2-135m"))
    assert isinstance(lean, LeanTokenizer)
    stat = smollm2_gguf.stat()
    directory = model_cache.cache_dir() / "tokenizers" / f"{smollm2_gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    return lean, AutoTokenizer.from_pretrained(str(directory))


def test_ids_and_text_equal_transformers(pair):
    lean, ref = pair
    for text in TEXTS:
        for special in (True, False):
            ids = lean(text, add_special_tokens=special).input_ids
            assert ids == list(ref(text, add_special_tokens=special).input_ids), (text, special)
            for skip in (True, False):
                assert lean.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert lean.eos_token_id == ref.eos_token_id is not None
    assert lean.chat_template == ref.chat_template


def test_chat_prompts_equal_transformers(pair):
    lean, ref = pair
    for chat in CHATS:
        for generation in (True, False):
            want = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation)
            assert lean.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation) == want


def test_templates_stay_in_the_sandbox():
    with pytest.raises(jinja2.exceptions.SecurityError):
        compile_template("{{ ''.__class__.__mro__[1].__subclasses__() }}").render()
    with pytest.raises(jinja2.exceptions.SecurityError):
        compile_template("{% set ns = namespace(_secret=1) %}{{ ns }}").render()
    with pytest.raises(jinja2.exceptions.TemplateError, match="no system role"):
        compile_template("{{ raise_exception('no system role') }}").render()
    assert compile_template("{{ x | tojson }}").render(x={"a": "<b>"}) == '{"a": "<b>"}'  # HTML left alone


def test_q4_gguf_generates_without_importing_transformers(smollm2_gguf, pair):
    """load_model(q4) on a plain llama GGUF, a chat prompt and two tokens: transformers never imported."""
    script = (
        "import sys\n"
        "from edgeheads.headnode.loading import load_model\n"
        "from edgeheads.headnode.local import LocalGenerator\n"
        "from edgeheads.headnode.sampling import SamplingParams\n"
        f"g = LocalGenerator(load_model({str(smollm2_gguf)!r}, 'q4', progress=False), own_weights=True)\n"
        "r = g.generate('Name a colour.', SamplingParams(max_new_tokens=2), chat=True)\n"
        "assert len(r.token_ids) == 2, r\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_settings_transformers_applies_itself_keep_transformers(tmp_path):
    """A saved tokenizer whose config holds a setting transformers' wrapper acts on after loading
    the Rust tokenizer (adding BOS/EOS, splitting special tokens, a prefix space) is not served
    lean, whatever that setting would change; nor is one without a post-processor."""
    import json
    import shutil

    from edgeheads.headnode.lean_tokenizer import WRAPPER_SETTINGS, supported

    source = next((model_cache.cache_dir() / "tokenizers").glob("SmolLM2-135M-Instruct*"))
    assert supported(source)
    config = json.loads((source / "tokenizer_config.json").read_text())
    for key in WRAPPER_SETTINGS:
        copy = tmp_path / key
        shutil.copytree(source, copy)
        (copy / "tokenizer_config.json").write_text(json.dumps({**config, key: True}))
        assert not supported(copy), key
        (copy / "tokenizer_config.json").write_text(json.dumps({**config, key: False}))
        assert supported(copy), key
    backend = json.loads((source / "tokenizer.json").read_text())
    (copy / "tokenizer.json").write_text(json.dumps({**backend, "post_processor": None}))
    assert not supported(copy)
