"""Model specifiers, the built-in model cache, and clear errors for bad models."""

from __future__ import annotations

import os

import pytest
from transformers import BertConfig

from edgeheads.headnode import model_cache
from edgeheads.headnode.loading import ModelLoadError, load_model, load_transformers, resolve
from edgeheads.headnode.slicing import UnsupportedModelError
from tiny_configs import TINY_CONFIGS


@pytest.fixture
def cached_builtin(tmp_path, monkeypatch):
    """A stand-in file where the built-in model's cache entry goes (resolving reads no content),
    and any download fails: nothing here fetches or loads the real model."""
    monkeypatch.setenv("EDGEHEADS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on the discard port
    target = model_cache.cached_path(model_cache.BUILTIN_MODELS["smollm2-135m"])
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF stand-in")
    return target


def test_resolve_kinds(tmp_path, cached_builtin):
    assert resolve(str(cached_builtin)).kind == "gguf"
    gguf_dir = tmp_path / "g"
    gguf_dir.mkdir()
    os.symlink(cached_builtin, gguf_dir / "model.gguf")
    src = resolve(str(gguf_dir))
    assert (src.kind, src.location) == ("gguf", str((gguf_dir / "model.gguf").resolve()))
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    assert resolve("smollm2-135m").location == str(cached_builtin)


@pytest.mark.parametrize("spec", ["no-such-model", "./missing/dir", "/abs/missing.gguf", "a/b/c"])
def test_unknown_model_is_a_clear_error(spec):
    with pytest.raises(ModelLoadError, match="not found.*built-in: smollm2-135m"):
        resolve(spec)


def test_bad_files_are_clear_errors(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="must be .gguf"):
        resolve(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve(str(tmp_path))


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        tmp_path)
    with pytest.raises(UnsupportedModelError, match="'bert'.*gpt2, llama, mistral, qwen2"):
        load_transformers(resolve(str(tmp_path)))


def test_local_transformers_directory_loads_and_slices(save_tiny_model):
    path = save_tiny_model(TINY_CONFIGS["llama-gqa"], "llama")
    loaded = load_model(str(path), progress=False)
    assert loaded.parts.shape.n_kv_heads == 2
    assert len(loaded.parts.blocks) == 3 * (2 + 2)
    assert loaded.has_chat_template


def test_offline_fetch_is_a_clear_error_and_leaves_no_partial_file(tmp_path, monkeypatch):
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("EDGEHEADS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on the discard port
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(model_cache.ModelFetchError, match="offline"):
        model_cache.fetch(model_cache.BUILTIN_MODELS["smollm2-135m"], progress=False)
    target = model_cache.cached_path(model_cache.BUILTIN_MODELS["smollm2-135m"])
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_cached_model_is_reused_without_download(cached_builtin):
    assert model_cache.fetch(model_cache.BUILTIN_MODELS["smollm2-135m"], progress=False) == cached_builtin
    assert cached_builtin.read_bytes() == b"GGUF stand-in"
