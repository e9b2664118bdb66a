"""Shared fixtures: the real SmolLM2 checkpoint, a tiny tokenizer and tiny random models, and the
gates of the ``slow`` and ``system`` markers.

Markers (registered in pyproject.toml):

- ``slow``: loads the real SmolLM2 weights. Any test that uses the ``smollm2*`` fixtures gets it
  automatically, so ``-m "not slow"`` never downloads the model.
- ``system``: several processes, Docker, network namespaces or root.

Both run by default and in CI. Locally, deselect them with ``-m "not slow"``, ``--skip slow``
(repeatable, or ``--skip slow,system``) or ``EDGEHEADS_TEST_SKIP=slow,system``. With ``CI`` set,
asking to skip is an error, and a missing capability (root, cgroups, namespaces) fails the test
instead of skipping it: see the ``require_capability`` fixture.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The runtime's default --dtype is auto (the built-in model runs as q4). The tests compare with
# transformers' fp32 and with each other, so every process they start (CLI, daemons, compose via
# EDGEHEADS_DTYPE) runs the exact reference unless a test names a format; tests of the default
# itself unset this (tests/test_dtype_default.py).
os.environ.setdefault("EDGEHEADS_HEADNODE__DTYPE", "fp32")
# The controller's default policy is resource-aware, which places blocks by measured speed and may
# leave a loopback worker empty or move blocks as the machine's load changes. Tests of the
# distributed machinery (relay hops, recovery, sessions on every worker) need every worker to hold
# blocks, as `spread` guarantees, so every cluster they start uses it unless a test names a policy;
# the tests of the default itself unset this (the README command in tests/test_cli_cluster.py; compose
# containers never see it).
POLICY_ENV = "EDGEHEADS_CONTROLLER__POLICY"
os.environ.setdefault(POLICY_ENV, "spread")
torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))

GATED_MARKERS = ("slow", "system")
SKIP_ENV = "EDGEHEADS_TEST_SKIP"
REAL_MODEL_FIXTURES = {"smollm2_gguf", "smollm2", "smol_tokenizer"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--skip", action="append", default=[], metavar="MARKER[,MARKER]",
                     help=f"skip tests marked {' or '.join(GATED_MARKERS)} (also ${SKIP_ENV}); refused when CI is set")


def _skipped_markers(config: pytest.Config) -> set[str]:
    asked = [*config.getoption("--skip"), os.environ.get(SKIP_ENV, "")]
    names = {name.strip() for value in asked for name in value.split(",") if name.strip()}
    unknown = names - set(GATED_MARKERS)
    if unknown:
        raise pytest.UsageError(f"--skip / {SKIP_ENV}: unknown marker(s) {sorted(unknown)}; "
                                f"known: {', '.join(GATED_MARKERS)}")
    if names and in_ci():
        raise pytest.UsageError(f"CI runs every test: unset {SKIP_ENV} and drop --skip (asked to skip {sorted(names)})")
    return names


@pytest.hookimpl(tryfirst=True)  # before -m filtering, so that `-m "not slow"` sees the added markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skipped = _skipped_markers(config)
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
        for name in skipped:
            if item.get_closest_marker(name) is not None:
                item.add_marker(pytest.mark.skip(reason=f"{name} tests skipped (--skip / {SKIP_ENV})"))


def require(name: str, ok: bool, why: str = "") -> None:
    """Skip the calling test when capability ``name`` is missing, or fail it when CI is set:
    CI machines have every capability, so a missing one there is a broken set-up, not a reason to pass."""
    if ok:
        return
    message = f"needs {name}" + (f": {why}" if why else "")
    if in_ci():
        pytest.fail(f"{message} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def require_capability() -> Callable[..., None]:
    """``require_capability("root", os.geteuid() == 0)``: skip locally, fail in CI."""
    return require


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The built-in default model file (downloaded once into the user cache)."""
    from edgeheads.headnode import model_cache

    return model_cache.fetch(model_cache.BUILTIN_MODELS["smollm2-135m"], progress=False)


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """(transformers model, tokenizer) for SmolLM2 with real weights, fp32."""
    from edgeheads.headnode.loading import ModelSource, load_transformers

    return load_transformers(ModelSource("gguf", str(smollm2_gguf), "smollm2-135m"))


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2):
    """The real SmolLM2 tokenizer (loads the real model: the test becomes ``slow``)."""
    return smollm2[1]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A small byte-level BPE tokenizer with a chat template, built without any download
    (tests/tiny_configs.py); the tokenizer of every saved tiny model."""
    from tiny_configs import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def save_tiny_model(tmp_path_factory, tiny_tokenizer):
    """Factory: save a random-initialized model for ``config`` (with the tiny tokenizer)
    as a local transformers directory and return its path."""
    from transformers import AutoModelForCausalLM

    def save(config, name: str, seed: int = 0) -> Path:
        if config.vocab_size < len(tiny_tokenizer):
            raise ValueError(f"{name}: vocab_size {config.vocab_size} < the tiny tokenizer's {len(tiny_tokenizer)}")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        out = tmp_path_factory.mktemp(name)
        model.save_pretrained(out)
        tiny_tokenizer.save_pretrained(out)
        return out

    return save
