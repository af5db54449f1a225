"""Per-token overhead of the engine: a bare ctypes loop vs vlserve's engine, same process.

    python -m bench.decode_overhead [--dir models/bench] [--tokens 128] [--reps 5]

Baseline: the tightest Python loop llama-cpp-python allows (llama_decode of one token +
llama_sampler_sample, greedy). vlserve: the same prompt through Engine.generate (scheduler,
detokenizer, event hand-off to asyncio), streaming. Each run is its own process (two
llama.cpp thread teams in one process would spin against each other), and runs alternate
(A, B, A, B, ...) so background load hits both alike; the table shows median tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import llama_cpp

from server.config import load_settings
from server.demo_model import make_demo_model
from server.engine import Engine, GenerationRequest, SamplingParams, TokenEvent
from server.engine.types import ChatMessage

PROMPT = "USER: Tell me a long story about a lighthouse keeper.\nASSISTANT:"


def bare_loop(model_path: Path, n_tokens: int, reps: int, threads: int) -> list[float]:
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch = 4096, 512
    cparams.n_threads = cparams.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    vocab = llama_cpp.llama_model_get_vocab(model)
    raw = PROMPT.encode()
    tokens = (llama_cpp.llama_token * 512)()
    n_prompt = llama_cpp.llama_tokenize(vocab, raw, len(raw), tokens, 512, True, False)
    sampler = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(sampler, llama_cpp.llama_sampler_init_greedy())
    mem = llama_cpp.llama_get_memory(ctx)
    rates = []
    for _ in range(reps):
        llama_cpp.llama_memory_clear(mem, True)
        llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, n_prompt))
        token = llama_cpp.llama_sampler_sample(sampler, ctx, -1)
        one = (llama_cpp.llama_token * 1)()
        started = time.perf_counter()
        for _ in range(n_tokens):
            one[0] = token
            llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1))
            token = llama_cpp.llama_sampler_sample(sampler, ctx, -1)
        rates.append(n_tokens / (time.perf_counter() - started))
    llama_cpp.llama_sampler_free(sampler)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return rates


def engine_runs(text: Path, mmproj: Path, n_tokens: int, reps: int, threads: int
                ) -> list[float]:
    os.environ["VLSERVE_N_THREADS"] = str(threads)
    settings = load_settings(None, model=text, mmproj=mmproj, n_parallel=1,
                             max_tokens_cap=4096)
    engine = Engine(settings)
    engine.start()
    while not engine.ready:
        if engine.error:
            raise RuntimeError(engine.error)
        time.sleep(0.05)

    async def one(i: int) -> float:
        request = GenerationRequest(
            messages=[ChatMessage("user", (f"Tell me a long story about a lighthouse keeper {i}.",
                                           ))],
            max_tokens=n_tokens + 1, sampling=SamplingParams(temperature=0.0, ignore_eos=True))
        first = 0.0
        async for event in engine.generate(request):
            if isinstance(event, TokenEvent) and not first:
                first = time.perf_counter()
        # Tokens after the first, over the time from the first to the last.
        return (request.timer.completion_tokens - 1) / (time.perf_counter() - first)

    rates = [asyncio.run(one(i)) for i in range(reps)]
    engine.stop()
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("models/bench"))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--only", choices=("bare", "engine"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    text, mmproj = args.dir / "bench-llava-text.gguf", args.dir / "bench-llava-mmproj.gguf"
    if args.only == "bare":
        print(f"RATE {bare_loop(text, args.tokens, 1, args.threads)[0]}")
        return 0
    if args.only == "engine":
        print(f"RATE {engine_runs(text, mmproj, args.tokens, 1, args.threads)[0]}")
        return 0
    if not text.is_file():
        make_demo_model(args.dir, size="bench")
    rates: dict[str, list[float]] = {"bare": [], "engine": []}
    for _ in range(args.reps):
        for side in rates:
            proc = subprocess.run(
                [sys.executable, "-m", "bench.decode_overhead", "--only", side, "--dir",
                 str(args.dir), "--tokens", str(args.tokens), "--threads", str(args.threads)],
                capture_output=True, text=True, check=True)
            rates[side].append(float(proc.stdout.split("RATE ")[-1]))
    b, m = statistics.median(rates["bare"]), statistics.median(rates["engine"])
    print(f"\n{'decode, 1 stream, greedy':<34} {'tok/s':>8}")
    print(f"{'bare ctypes loop (baseline)':<34} {b:8.1f}")
    print(f"{'vlserve engine (no HTTP)':<34} {m:8.1f}   ratio {m / b:.3f}")
    print(f"runs: bare {[round(x) for x in rates['bare']]}, "
          f"engine {[round(x) for x in rates['engine']]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
