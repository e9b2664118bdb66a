"""A saved fast tokenizer served by the ``tokenizers`` library, without transformers' wrapper.

transformers' ``AutoTokenizer`` costs a head node about 90 MiB of resident memory for
SmolLM2's 49k-token vocabulary (its own import, then its wrapper's tables over the Rust
tokenizer); the Rust tokenizer alone costs about 35. For a 4-bit 135M model that is as much
as the weights. ``LeanTokenizer`` reads what ``save_pretrained`` wrote (``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja``) and offers what edgeheads calls on a
tokenizer, with transformers' results:
- ``tok(text, add_special_tokens=True).input_ids``: the Rust tokenizer's encoding (its
  post-processor adds the special tokens, as transformers' fast tokenizers do);
- ``decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=...)``;
- ``apply_chat_template(messages, tokenize=False, add_generation_prompt=...)``: rendered in
  jinja2's immutable sandbox with the environment transformers gives chat templates (trimmed
  blocks, loop controls, ``raise_exception``, ``strftime_now``, a ``tojson`` that leaves HTML
  alone, ``dict`` and ``namespace`` that refuse underscore names). A template that needs more
  (transformers' ``{% generation %}`` tag) is rendered by transformers itself;
- ``eos_token_id``, ``chat_template``, ``backend_tokenizer``.

tests/test_lean_tokenizer.py compares each with ``AutoTokenizer`` on the same directory.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers' clean_up_tokenization: spaces before punctuation and English contractions
CLEAN_UPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


# tokenizer_config.json settings with which transformers' wrapper changes the Rust tokenizer's
# behaviour after loading it (rewriting its post-processor, splitting special tokens, ...):
# a directory that sets any of them is served by transformers itself
WRAPPER_SETTINGS = ("add_bos_token", "add_eos_token", "split_special_tokens", "add_prefix_space")


def supported(directory: str | Path) -> bool:
    """Whether LeanTokenizer gives transformers' results for this directory: a tokenizer.json
    with a post-processor, and none of WRAPPER_SETTINGS in its tokenizer_config.json."""
    directory = Path(directory)
    try:
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        backend = json.loads((directory / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return False
    return backend.get("post_processor") is not None and not any(
        config.get(key) not in (None, False) for key in WRAPPER_SETTINGS)


class LeanTokenizer:
    """A tokenizer directory written by ``save_pretrained`` of a fast tokenizer (``supported``)."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.backend_tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = directory / "chat_template.jinja"
        self.chat_template: str | None = template.read_text() if template.is_file() else config.get("chat_template")
        self.special_tokens_map = {key: _content(config[key]) for key in SPECIAL_KEYS if config.get(key)}
        eos = self.special_tokens_map.get("eos_token")
        self.eos_token_id: int | None = None if eos is None else self.backend_tokenizer.token_to_id(eos)
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self._bpe = type(self.backend_tokenizer.model).__name__ == "BPE"

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        ids = self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return SimpleNamespace(input_ids=list(ids))

    def decode(self, ids: list[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        text = self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        if clean and not self._bpe:  # transformers skips it for BPE models (it would eat real spaces)
            for before, after in CLEAN_UPS:
                text = text.replace(before, after)
        return text

    def apply_chat_template(self, messages: list[dict[str, Any]], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        if tokenize:
            raise ValueError("LeanTokenizer.apply_chat_template renders text only (tokenize=False)")
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]  # as transformers normalizes
        try:
            template = compile_template(self.chat_template)
        except jinja2.TemplateSyntaxError:  # e.g. {% generation %}: transformers' own renderer knows it
            from transformers.utils.chat_template_utils import render_jinja_template

            rendered, _ = render_jinja_template(conversations=[chat], chat_template=self.chat_template,
                                                add_generation_prompt=add_generation_prompt, **self.special_tokens_map)
            return rendered[0]
        return template.render(messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                               **self.special_tokens_map)


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace() refusing underscore-prefixed names (no reach into Python internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja's own signature trick: namespace(self=...) works
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """A chat template compiled in the immutable sandbox, with the names chat templates use."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=lambda *args, **kwargs: dict(*args, **kwargs), namespace=_Namespace)
    return env.from_string(source)


def _content(token: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return token["content"] if isinstance(token, dict) else str(token)
