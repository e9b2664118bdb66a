"""Fuzz every RPC of every daemon and every relay frame kind of a loopback cluster while it
generates, and report what came back.

    python benchmarks/fuzz.py [--requests 10000] [--seed N] [--model tiny|smollm2-135m|PATH]
                              [--workers 3] [--new-tokens 48]

The cases and the runner are the CI test's (tests/fuzz_cases.py, tests/fuzz_relay.py,
tests/fuzz_run.py; tests/test_fuzz.py runs 2,000): malformed, truncated, oversized, wrong-type
and random requests and frames, defanged so that none can name the live generation's objects.
Printed: requests per RPC / relay case, relay frames per kind, the outcome tally (status codes),
also per RPC / relay case, requests/s, whether every concurrent generation stayed identical to the in-process reference,
and whether every daemon survived and still serves. The exit status is 1 if anything went wrong
(a hang, an UNKNOWN or INTERNAL status, a changed generation, a daemon down).

--model tiny (the default) is the tests' random llama-gqa model, saved to a temporary folder.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402

from edgeheads.headnode.embedded import LocalCluster  # noqa: E402
from edgeheads.headnode.loading import load_model  # noqa: E402
from fuzz_run import BAD, run_fuzz  # noqa: E402


def save_tiny(folder: Path) -> Path:
    """The tests' llama-gqa model (tests/tiny_configs.py), random weights from seed 2."""
    from transformers import AutoModelForCausalLM

    from tiny_configs import TINY_CONFIGS, tiny_tokenizer

    torch.manual_seed(2)
    AutoModelForCausalLM.from_config(TINY_CONFIGS["llama-gqa"]).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=None, help="default: a random one (printed)")
    parser.add_argument("--model", default="tiny", help="tiny, smollm2-135m or a model path")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48, help="of each concurrent generation")
    args = parser.parse_args()
    seed = random.randrange(2**32) if args.seed is None else args.seed
    logging.basicConfig(level=logging.WARNING)
    print(f"fuzz seed {seed}: {args.requests} requests, model {args.model}, {args.workers} workers", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = str(save_tiny(Path(tmp))) if args.model == "tiny" else args.model
        model = load_model(model_path, progress=False)
        with LocalCluster(model_path, workers=args.workers, progress=False) as cluster:
            report = run_fuzz(cluster, model, args.requests, seed, new_tokens=args.new_tokens)
            logs = {name: cluster.log_tail(name, 5) for name in cluster.procs}
    print(report.summary())
    print("outcomes per RPC / relay case:\n" + report.outcomes_per_label())
    ok = (report.answered == report.sent and not any(report.by_outcome[k] for k in BAD)
          and report.generations >= 1 and report.identical == report.generations and not report.generation_errors
          and all(report.daemons_alive.values()) and all(report.daemons_serving.values()))
    print("verdict:", "PASS" if ok else "FAIL")
    if not ok:
        for name, tail in logs.items():
            print(f"--- {name} log tail\n{tail}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
