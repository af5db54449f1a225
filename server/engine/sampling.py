"""Sampler chain from request parameters (llama.cpp's own samplers, no Python per token)."""

from __future__ import annotations

import random

import llama_cpp

from server.engine.types import SamplingParams


def build_sampler_chain(params: SamplingParams, n_vocab: int,
                        eog_tokens: frozenset[int] = frozenset()) -> llama_cpp.llama_sampler_p:
    """A chain the caller owns (free with llama_sampler_free)."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    if params.ignore_eos and eog_tokens:
        # End-of-generation tokens can never be drawn: the answer runs to max_tokens.
        biases = (llama_cpp.llama_logit_bias * len(eog_tokens))(
            *(llama_cpp.llama_logit_bias(t, float("-inf")) for t in sorted(eog_tokens)))
        add(chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(eog_tokens), biases))
    if (
        params.repeat_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    ):
        add(
            chain,
            llama_cpp.llama_sampler_init_penalties(
                n_vocab,
                params.penalty_last_n,
                params.repeat_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            ),
        )
    if params.temperature <= 0.0:
        add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        add(chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
    add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
    seed = params.seed if params.seed is not None else random.getrandbits(32)
    add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain
