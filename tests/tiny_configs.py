"""Small random-initialized configs covering every supported architecture feature."""

from __future__ import annotations

from transformers import GPT2Config, LlamaConfig, Qwen2Config

VOCAB = 49152  # the SmolLM2 tokenizer's vocabulary, so saved tiny models can share it


def llama(**overrides) -> LlamaConfig:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5)
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
                                  tie_word_embeddings=False),
    "llama-tied": llama(tie_word_embeddings=True),
    "llama-odd-heads": llama(hidden_size=90, num_attention_heads=9, num_key_value_heads=3),
    "llama-head-dim-override": llama(hidden_size=48, num_attention_heads=3, num_key_value_heads=1, head_dim=32),
    "llama3-rope-scaling": llama(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "llama-linear-rope": llama(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama-yarn-rope": llama(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                           "original_max_position_embeddings": 64}),
}
