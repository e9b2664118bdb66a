"""First-token latency through the OpenAI-compatible HTTP API vs the project's Python client,
on the same running cluster, in the same run.

    python benchmarks/http_first_token.py [--model smollm2-135m] [--workers 3] [--repeats 10]
                                          [--first-tokens 8] [--total-tokens 32] [--json PATH]
    python benchmarks/http_first_token.py --cluster HOST:PORT --http http://HOST:PORT [...]

Without --cluster it starts an embedded cluster (LocalCluster: a controller, --workers
workers and a head node, each its own process, default placement policy); with --cluster
and --http it measures an already running head node (the docker compose one, say).

Four paths, all greedy (temperature 0) on the same prompt:
  client       Client.generate(stream=True), chat=False: call to the first token event
  completions  openai's completions.create(stream=True): call to the first chunk with text
  client-chat  Client.generate(stream=True), chat=True (the chat template, as /chat applies it)
  chat         openai's chat.completions.create(stream=True): call to the first chunk with content
Each HTTP path is compared with the client path that sends the model the same prompt tokens
(completions/client, chat/client-chat): the chat template makes the prompt longer, so its
prefill, and first-token latency, differ from the plain prompt's.

After 2 warm-up requests per path, each of --repeats rounds runs every path once with
--first-tokens new tokens (the first-token figure), then once with --total-tokens (total
time, tokens/s, and decode tokens/s after the first token: the overhead per token). The path
order rotates from round to round so drift and noise hit the paths alike. The greedy text of
each HTTP path must equal its client path's; otherwise it prints MISMATCH and exits 1.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass

import openai

from edgeheads.headnode.client import Client
from edgeheads.headnode.embedded import LocalCluster

# ends mid-sentence: the instruct model, given a finished sentence without its chat template, ends at once
PROMPT = "Write a short story about a robot who learns to paint. Once upon a time,"
PATHS = ("client", "completions", "client-chat", "chat")
PAIRS = {"completions": "client", "chat": "client-chat"}  # HTTP path -> client path, same prompt tokens
WARMUPS = 2


@dataclass
class Sample:
    first: float  # seconds from the call to the first token (client) or first chunk with text (HTTP)
    total: float  # seconds from the call to the end of the stream
    text: str
    tokens: int | None = None  # new tokens, where the path reports them
    prompt_tokens: int | None = None
    headers: float | None = None  # HTTP: seconds until create() returned (the response headers)


def via_client(client: Client, prompt: str, chat: bool, max_tokens: int, count: bool) -> Sample:
    t0 = time.perf_counter()
    if not count:  # the streaming generate: one item per token event (text may be "" mid-character)
        first, pieces = None, []
        for piece in client.generate(prompt, max_new_tokens=max_tokens, temperature=0.0, chat=chat, stream=True):
            if first is None:
                first = time.perf_counter() - t0
            pieces.append(piece)
        total = time.perf_counter() - t0
        return Sample(total if first is None else first, total, "".join(pieces))
    seen: list[float] = []  # generate_full streams too, and also reports the token counts
    out = client.generate_full(prompt, max_new_tokens=max_tokens, temperature=0.0, chat=chat,
                               on_text=lambda _: seen or seen.append(time.perf_counter() - t0))
    total = time.perf_counter() - t0
    return Sample(seen[0] if seen else total, total, out.text, len(out.token_ids), out.prompt_tokens)


def via_http(api: openai.OpenAI, model: str, prompt: str, chat: bool, max_tokens: int) -> Sample:
    kw = dict(model=model, max_tokens=max_tokens, temperature=0, stream=True,
              stream_options={"include_usage": True})
    t0 = time.perf_counter()
    if chat:
        stream = api.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kw)
    else:
        stream = api.completions.create(prompt=prompt, **kw)
    headers = time.perf_counter() - t0
    first, pieces, usage = None, [], None
    for chunk in stream:
        usage = chunk.usage or usage
        if not chunk.choices:
            continue
        text = chunk.choices[0].delta.content if chat else chunk.choices[0].text
        if text:  # chat's first chunk carries only the role
            if first is None:
                first = time.perf_counter() - t0
            pieces.append(text)
    total = time.perf_counter() - t0
    return Sample(total if first is None else first, total, "".join(pieces),
                  usage and usage.completion_tokens, usage and usage.prompt_tokens, headers)


def p90(xs: list[float]) -> float:
    return sorted(xs)[math.ceil(0.9 * len(xs)) - 1]


def mismatches(runs: dict[str, list[Sample]]) -> list[str]:
    out = [f"MISMATCH: {p} generated no text (the prompt met EOS at once?), so no first token to time"
           for p in PATHS if not all(s.text for s in runs[p])]
    for http, client in PAIRS.items():
        texts = {s.text for s in runs[client] + runs[http]}
        if len(texts) > 1:
            out.append(f"MISMATCH: {client} and {http} gave {len(texts)} different greedy texts: "
                       + " | ".join(repr(t) for t in sorted(texts)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--cluster", metavar="HOST:PORT", help="a running head node's gRPC address (with --http)")
    ap.add_argument("--http", metavar="URL", help="its HTTP API, http://HOST:PORT (with --cluster)")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--first-tokens", type=int, default=8, help="max tokens of the first-token requests")
    ap.add_argument("--total-tokens", type=int, default=32, help="max tokens of the tokens/s requests")
    ap.add_argument("--json", metavar="PATH", help="also write the figures here")
    args = ap.parse_args()
    if bool(args.cluster) != bool(args.http):
        ap.error("--cluster and --http go together")
    with ExitStack() as stack:
        if args.cluster:
            address, base_url, where = args.cluster, args.http.rstrip("/"), f"head node {args.cluster}"
        else:
            print(f"starting a {args.workers}-worker cluster of {args.model} ...", file=sys.stderr)
            cluster = stack.enter_context(LocalCluster(args.model, workers=args.workers, progress=False))
            address, base_url = cluster.address, f"http://{cluster.http_address}"
            where = f"embedded cluster, {args.workers} workers on loopback"
        base_url = base_url if base_url.endswith("/v1") else base_url + "/v1"
        client = stack.enter_context(Client(address))
        # One openai client for the whole run, created here and not per request, as an application
        # holds one: its httpx pool keeps the connection alive, so no timed request pays for building
        # a client or a TCP connect (the gRPC Client above likewise keeps one channel).
        api = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
        stack.callback(api.close)
        model = api.models.list().data[0].id
        run = {"client": lambda n, c: via_client(client, args.prompt, False, n, c),
               "completions": lambda n, c: via_http(api, model, args.prompt, False, n),
               "client-chat": lambda n, c: via_client(client, args.prompt, True, n, c),
               "chat": lambda n, c: via_http(api, model, args.prompt, True, n)}

        warm = {p: [run[p](args.first_tokens, False) for _ in range(WARMUPS)] for p in PATHS}
        if bad := mismatches(warm):
            print("\n".join(bad))
            sys.exit(1)
        first = {p: [] for p in PATHS}
        full = {p: [] for p in PATHS}
        t_start = time.monotonic()
        for r in range(args.repeats):
            order = PATHS[r % len(PATHS):] + PATHS[:r % len(PATHS)]
            for p in order:
                first[p].append(run[p](args.first_tokens, False))
            for p in order:
                full[p].append(run[p](args.total_tokens, True))
            print(f"round {r + 1}/{args.repeats}: first token "
                  + ", ".join(f"{p} {first[p][-1].first * 1e3:.0f} ms" for p in PATHS)
                  + f" ({time.monotonic() - t_start:.0f} s)", file=sys.stderr)

    figures = {}
    for p in PATHS:
        fs = [s.first for s in first[p]]
        rates = [s.tokens / s.total for s in full[p]]
        decode = [(s.tokens - 1) / (s.total - s.first) for s in full[p] if s.tokens > 1 and s.total > s.first]
        heads = [s.headers for s in first[p] if s.headers is not None]
        figures[p] = {"first_token_s": fs, "first_token_median_s": statistics.median(fs),
                      "first_token_p90_s": p90(fs), "headers_median_s": statistics.median(heads) if heads else None,
                      "total_s": [s.total for s in full[p]], "tokens": [s.tokens for s in full[p]],
                      "prompt_tokens": full[p][0].prompt_tokens, "tokens_per_s_median": statistics.median(rates),
                      "decode_tokens_per_s_median": statistics.median(decode) if decode else float("nan")}
    def ratio(http: str, client: str, key: str) -> float:
        return figures[http][key] / figures[client][key]
    ratios = {f"{h}/{c}": {"first_token_median": ratio(h, c, "first_token_median_s"),
                           "tokens_per_s_median": ratio(h, c, "tokens_per_s_median")} for h, c in PAIRS.items()}

    print(f"model {model}, {where}; prompt {figures['client']['prompt_tokens']} tokens plain, "
          f"{figures['client-chat']['prompt_tokens']} with the chat template; greedy; "
          f"{args.repeats} rounds after {WARMUPS} warm-ups per path")
    print(f"{'':12s} {'first token (max_tokens ' + str(args.first_tokens) + ')':>37s}   "
          f"{'max_tokens ' + str(args.total_tokens):>41s}")
    print(f"{'path':12s} {'median ms':>9s} {'p90 ms':>7s} {'headers ms':>10s} {'ratio':>7s}   "
          f"{'tokens':>6s} {'total ms':>8s} {'tok/s':>6s} {'decode tok/s':>12s} {'ratio':>7s}")
    for p in PATHS:
        f = figures[p]
        pair = next((f"{h}/{c}" for h, c in PAIRS.items() if h == p), None)
        heads = "-" if f["headers_median_s"] is None else f"{f['headers_median_s'] * 1e3:.0f}"
        r1 = f"{ratios[pair]['first_token_median']:6.3f}x" if pair else "      -"
        r2 = f"{ratios[pair]['tokens_per_s_median']:6.3f}x" if pair else "      -"
        tokens = "/".join(sorted({str(t) for t in f["tokens"]}))
        print(f"{p:12s} {f['first_token_median_s'] * 1e3:9.1f} {f['first_token_p90_s'] * 1e3:7.1f} {heads:>10s} "
              f"{r1:>7s}   {tokens:>6s} {statistics.median(f['total_s']) * 1e3:8.0f} "
              f"{f['tokens_per_s_median']:6.2f} {f['decode_tokens_per_s_median']:12.2f} {r2:>7s}")
    bad = mismatches(first) + mismatches(full)
    bad += [f"MISMATCH: {h} reported {s.tokens} tokens where {c} generated {t.tokens}"
            for h, c in PAIRS.items() for s, t in zip(full[h], full[c]) if s.tokens != t.tokens]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": model, "where": where, "repeats": args.repeats, "first_tokens": args.first_tokens,
                       "total_tokens": args.total_tokens, "paths": figures, "ratios": ratios,
                       "identical": not bad, "texts": {p: full[p][0].text for p in PATHS}}, fh, indent=1)
    for line in bad:
        print(line)
    r = ratios["completions/client"]
    print(f"headline (median of {args.repeats}): HTTP /v1/completions / Python client first-token latency = "
          f"{r['first_token_median']:.3f}x, tokens/s = {r['tokens_per_s_median']:.3f}x; greedy text "
          + ("MISMATCH" if bad else "identical"))
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
