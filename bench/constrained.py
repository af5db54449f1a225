"""Constrained decoding cost: JSON-schema answers vs free text, on the same model and loop.

    python -m bench.constrained [--model models/gemma3-270m/gemma-3-270m-q4_k_m.gguf]
                                [--demo] [--tokens 120] [--reps 3] [--threads 2]

Three samplers decode the same prompt in one process, alternating (A, B, C, A, ...) so
background load hits each alike; each row is the median of `--reps` runs:
- unconstrained: vlserve's free-text chain (greedy, end-of-generation banned so it runs
  to `--tokens`): the baseline;
- constrained: vlserve's GrammarSampler (chain first, grammar checks only the chosen token,
  full-vocabulary masking only on a rejection);
- grammar-first: the naive chain llama-cpp-python's `Llama` builds (grammar over the whole
  vocabulary on every token, then greedy).
The fixed case: "List many fruits.", temperature 0, a schema whose `fruits` is an array of
strings from an enum of 20 fruit names. `--demo` runs the bench-size demo model instead
(random weights: the grammar refuses nearly every first draw, the slow path's worst case).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import llama_cpp

from server.demo_model import make_demo_model
from server.engine.constraints import schema_grammar
from server.engine.sampling import TokenSampler, build_sampler, build_sampler_chain
from server.engine.types import SamplingParams
from server.engine.utf8_guard import Utf8Vocab
from server.timings import StageTimer

PROMPT = "USER: List many fruits.\nASSISTANT:"
FRUITS = ["apple", "banana", "cherry", "date", "elderberry", "fig", "grape", "guava",
          "kiwi", "lemon", "lime", "mango", "melon", "orange", "papaya", "peach", "pear",
          "plum", "raspberry", "strawberry"]
SCHEMA = {"type": "object", "properties": {"fruits": {"type": "array", "items": {
    "type": "string", "enum": FRUITS}}}, "required": ["fruits"], "additionalProperties": False}
GEMMA = Path("models/gemma3-270m/gemma-3-270m-q4_k_m.gguf")


class Run:
    """One llama context and the prompt's KV, reused by every sampler."""

    def __init__(self, model_path: Path, threads: int) -> None:
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(
            str(model_path).encode(), llama_cpp.llama_model_default_params())
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch = 2048, 512
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.eog = frozenset(t for t in range(n_vocab)
                             if llama_cpp.llama_vocab_is_eog(self.vocab, t))
        self.utf8 = Utf8Vocab([_piece(self.vocab, t) for t in range(n_vocab)], self.eog)
        raw = PROMPT.encode()
        buf = (llama_cpp.llama_token * 256)()
        n = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), buf, 256, True, False)
        self.prompt = buf[:n]

    def decode(self, sampler_sample: Callable[[], int], n_tokens: int) -> tuple[float, int]:
        """ms per generated token (decode + sampling) and how many tokens were made."""
        mem = llama_cpp.llama_get_memory(self.ctx)
        llama_cpp.llama_memory_clear(mem, True)
        tokens = (llama_cpp.llama_token * len(self.prompt))(*self.prompt)
        llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(tokens, len(tokens)))
        one = (llama_cpp.llama_token * 1)()
        started = time.perf_counter()
        made = 0
        for _ in range(n_tokens):
            token = sampler_sample()
            made += 1
            if token in self.eog:
                break
            one[0] = token
            llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(one, 1))
        return (time.perf_counter() - started) * 1000 / made, made


def _piece(vocab: llama_cpp.llama_vocab_p, token: int) -> bytes:
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, 256, 0, False)
    return buf.raw[:max(n, 0)]


def variants(run: Run) -> dict[str, Callable[[], TokenSampler]]:
    grammar = schema_grammar(SCHEMA)

    def naive() -> TokenSampler:
        chain = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_grammar(
            run.vocab, grammar.encode(), b"root"))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        return TokenSampler(chain)

    return {
        "unconstrained": lambda: TokenSampler(build_sampler_chain(
            SamplingParams(temperature=0.0, ignore_eos=True), len(run.utf8.pieces), run.eog)),
        "constrained": lambda: build_sampler(
            SamplingParams(temperature=0.0, grammar=grammar), run.vocab, run.utf8, run.eog,
            StageTimer()),
        "grammar-first": naive,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=GEMMA)
    parser.add_argument("--demo", action="store_true", help="the bench-size demo model")
    parser.add_argument("--tokens", type=int, default=120)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = make_demo_model(Path("models/bench"), size="bench").text if args.demo else args.model
    run = Run(model, args.threads)
    makers = variants(run)
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in makers}
    for _ in range(args.reps):
        for name, make in makers.items():
            sampler = make()
            results[name].append(run.decode(lambda s=sampler: s.sample(run.ctx, -1),
                                            args.tokens))
            sampler.free()
    base = statistics.median(ms for ms, _ in results["unconstrained"])
    print(f"model {model.name}, {args.threads} threads, median of {args.reps}")
    print("| sampler | ms/token | tokens | tok/s vs unconstrained |\n|---|---|---|---|")
    for name, runs in results.items():
        ms = statistics.median(m for m, _ in runs)
        print(f"| {name} | {ms:.2f} | {runs[0][1]} | {base / ms:.2f}x |")


if __name__ == "__main__":
    main()
