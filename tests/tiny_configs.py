"""Small random-initialized configs covering every supported architecture feature, and a tiny
tokenizer built here (no download) for the models saved from them."""

from __future__ import annotations

import functools

from transformers import GPT2Config, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

VOCAB = 384
"""The tiny tokenizer's vocabulary size (checked when it is built); the tiny models share it."""

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Enough varied text for VOCAB - 256 - 3 merges; the non-ASCII words make characters that span tokens.
TRAINING_TEXT = """Once upon a time there was a little robot who lived on a small board at the edge of the network.
Every morning it woke up, read the weather, and told a joke to the other boards.
Name a colour. Name a planet. Tell me a joke. Hello, how are you today? I am fine, thank you!
The quick brown fox jumps over the lazy dog. Café, naïve, über, 東京, emoji 🙂 and more.
Attention, projection and feed-forward blocks are spread across the workers by the controller.
"""


@functools.cache
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on TRAINING_TEXT, with SmolLM2's special-token layout
    (<|endoftext|>=0, <|im_start|>=1 as BOS, <|im_end|>=2 as EOS) and a ChatML template.
    Training is deterministic and takes milliseconds. Every byte is a token, so any text
    round-trips and random ids below VOCAB always decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([TRAINING_TEXT], trainer)
    if backend.get_vocab_size() != VOCAB:
        raise RuntimeError(f"the tiny tokenizer has {backend.get_vocab_size()} tokens, expected {VOCAB}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def llama(**overrides) -> LlamaConfig:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5,
                bos_token_id=1, eos_token_id=2)
    return LlamaConfig(**(base | overrides))


TINY_CONFIGS = {
    "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=3, n_head=4, n_positions=256, bos_token_id=1,
                       eos_token_id=2),
    "gpt2-odd-heads": GPT2Config(vocab_size=VOCAB, n_embd=45, n_layer=2, n_head=5, n_positions=256,
                                 activation_function="gelu", bos_token_id=1, eos_token_id=2),
    "llama-gqa": llama(),
    "llama-mha": llama(num_key_value_heads=4),
    "llama-mqa": llama(num_key_value_heads=1),
    "llama-qkvo-bias": llama(attention_bias=True, mlp_bias=True),
    "qwen2-qkv-bias": Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "llama-tied": llama(tie_word_embeddings=True),
    "llama-odd-heads": llama(hidden_size=90, num_attention_heads=9, num_key_value_heads=3),
    "llama-head-dim-override": llama(hidden_size=48, num_attention_heads=3, num_key_value_heads=1, head_dim=32),
    "llama3-rope-scaling": llama(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "llama-linear-rope": llama(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama-yarn-rope": llama(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                           "original_max_position_embeddings": 64}),
}
