"""Block engine vs transformers' generate: same model, prompt and length, same process.

    python benchmarks/engine_vs_transformers.py [--model smollm2-135m] [--new-tokens 128] [--repeats 3]

Runs are interleaved (transformers, engine, transformers, ...) so that machine
noise hits both alike; tokens/s counts all new tokens over the whole call
(prefill included) and the median run is reported. EOS is disabled on both
sides so that both produce exactly --new-tokens tokens. fp32 throughout.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from edgeheads.headnode.loading import from_transformers, load_transformers, resolve
from edgeheads.headnode.local import LocalGenerator, set_threads
from edgeheads.headnode.sampling import SamplingParams

PROMPT = "Write a short story about a robot who learns to paint."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    set_threads()
    hf_model, tokenizer = load_transformers(resolve(args.model))
    generator = LocalGenerator(from_transformers(args.model, hf_model, tokenizer))
    prompt_ids = generator.encode(PROMPT, chat=True)
    hf_model.generation_config.eos_token_id = None
    params = SamplingParams(max_new_tokens=args.new_tokens, stop_on_eos=False)
    hf_rates, engine_rates = [], []
    same_tokens = True
    for _ in range(args.repeats):
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = hf_model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                    max_new_tokens=args.new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id or 0)
            hf_rates.append(args.new_tokens / (time.perf_counter() - t0))
        hf_ids = out[0, len(prompt_ids):].tolist()
        t0 = time.perf_counter()
        result = generator.generate_ids(prompt_ids, params)
        engine_rates.append(args.new_tokens / (time.perf_counter() - t0))
        same_tokens &= result.token_ids == hf_ids
    hf, eng = statistics.median(hf_rates), statistics.median(engine_rates)
    print(f"model {args.model}, fp32, {len(prompt_ids)} prompt tokens, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"transformers generate : {hf:7.2f} tokens/s   runs {[round(r, 2) for r in hf_rates]}")
    print(f"edgeheads block engine: {eng:7.2f} tokens/s   runs {[round(r, 2) for r in engine_rates]}")
    ratios = [round(e / h, 3) for e, h in zip(engine_rates, hf_rates)]
    print(f"ratio engine/transformers: {eng / hf:.3f}x   (target >= 1.2)   per run {ratios}   "
          f"identical tokens: {same_tokens}")


if __name__ == "__main__":
    main()
