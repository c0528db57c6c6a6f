"""Sampling and output: seeds, masks, penalties, stop strings, n > 1, logprobs, detokenization."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch

from sglang_gw.engine import Engine, InvalidParamError, SamplingParams
from sglang_gw.engine.detokenizer import IncrementalDetokenizer
from sglang_gw.engine.sampler import apply_logit_bias, apply_penalties, filter_probs


@pytest.fixture(scope="module")
def engine(tiny_models):
    # float32: greedy ties and HF's logprobs are compared exactly (`auto` is bfloat16 on a bf16-capable CPU).
    with Engine(model=str(tiny_models["llama"]), max_total_tokens=8192, dtype="float32") as eng:
        yield eng


PROMPT = [5, 17, 99, 250, 3, 8, 42]


def test_same_seed_same_output_different_seed_differs(engine):
    p = SamplingParams(max_new_tokens=16, temperature=1.0, ignore_eos=True)
    a = engine.generate(PROMPT, SamplingParams(**{**p.__dict__, "sampling_seed": 1}))[0]
    # Same seed again, now batched with other requests: still identical.
    batch = engine.generate([PROMPT, PROMPT[:3], PROMPT[2:]], SamplingParams(**{**p.__dict__, "sampling_seed": 1}))
    b = engine.generate(PROMPT, SamplingParams(**{**p.__dict__, "sampling_seed": 2}))[0]
    assert batch[0].output_ids == a.output_ids
    assert b.output_ids != a.output_ids


def test_filter_probs_masks():
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    assert filter_probs(probs, top_k=2, top_p=1.0, min_p=0.0).nonzero().flatten().tolist() == [0, 1]
    # top_p keeps the smallest prefix whose mass reaches p (0.5 + 0.2 >= 0.6).
    assert filter_probs(probs, top_k=-1, top_p=0.6, min_p=0.0).nonzero().flatten().tolist() == [0, 1]
    assert filter_probs(probs, top_k=-1, top_p=0.45, min_p=0.0).nonzero().flatten().tolist() == [0]
    # min_p keeps tokens with p >= min_p * max p (0.3 * 0.5 = 0.15).
    assert filter_probs(probs, top_k=-1, top_p=1.0, min_p=0.3).nonzero().flatten().tolist() == [0, 1, 2]


def test_top_k_one_and_tiny_top_p_equal_greedy(engine):
    greedy = engine.generate(PROMPT, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))[0]
    for extra in ({"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}):
        params = SamplingParams(max_new_tokens=12, temperature=1.5, ignore_eos=True, sampling_seed=5, **extra)
        assert engine.generate(PROMPT, params)[0].output_ids == greedy.output_ids, extra


def test_penalties_and_logit_bias_adjust_logits():
    class FakeReq:
        origin_input_ids = [1]
        output_ids = [3, 3, 4]
        params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=2.0,
                                logit_bias={2: 0.5})

    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, -4.0]])
    apply_penalties(logits, [FakeReq()])
    # token 1 (prompt): repetition only; token 3 (twice): 4/2 - 2*0.5 - 0.25; token 4: -4*2 - 0.5 - 0.25.
    assert logits.tolist() == [[1.0, 1.0, 3.0, 0.75, -8.75]]
    apply_logit_bias(logits, [FakeReq()])
    assert logits.tolist() == [[1.0, 1.0, 3.5, 0.75, -8.75]]


def test_min_new_tokens_and_stop_token_ids(engine):
    greedy = engine.generate(PROMPT, SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))[0].output_ids
    stop_at = greedy[2]
    out = engine.generate(PROMPT, SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=[stop_at]))[0]
    assert out.output_ids == greedy[:3] and out.finish_reason.matched == stop_at
    first = greedy[0]
    out = engine.generate(PROMPT, SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=[first],
                                                 min_new_tokens=2))[0]
    assert out.output_ids[0] != first


def test_stop_string_split_across_tokens_never_streams_partially(engine):
    params = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    full = engine.generate(PROMPT, params)[0]
    tok = engine.tokenizer
    # A stop string made of the tail of one token's text and the head of the next one's.
    pieces = [tok.decode(full.output_ids[: i + 1]) for i in range(len(full.output_ids))]
    cut = next(i for i in range(4, len(pieces) - 1)
               if len(pieces[i]) - len(pieces[i - 1]) >= 2 and len(pieces[i + 1]) - len(pieces[i]) >= 2)
    stop = pieces[cut][-2:] + pieces[cut + 1][len(pieces[cut]):][:2]
    assert stop in full.text

    async def stream():
        return [out async for out in engine.generate_stream(PROMPT, SamplingParams(
            max_new_tokens=40, temperature=0, ignore_eos=True, stop=(stop,)))]

    outs = asyncio.run(stream())
    final = outs[-1]
    assert final.finish_reason.type == "stop" and final.finish_reason.matched == stop
    assert final.text == full.text[: full.text.index(stop)]
    assert all(final.text.startswith(o.text) for o in outs), "a snapshot showed part of the stop string"
    kept = engine.generate(PROMPT, SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True,
                                                  stop=(stop,), no_stop_trim=True))[0]
    assert kept.text == full.text[: full.text.index(stop) + len(stop)]


def test_incremental_detokenizer_never_emits_half_a_character(engine):
    tok = engine.tokenizer
    text = "Héllo wörld 🙂 你好世界 and more 🙂🙂"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, skip_special_tokens=True, spaces_between_special_tokens=True)
    deltas = [detok.add(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == text
    assert any(d == "" for d in deltas), "the text was expected to hold multi-token characters"


def test_n_samples_share_the_prompt_kv(engine):
    prompt = list(range(10, 80))
    outs = engine.generate(prompt, SamplingParams(max_new_tokens=10, temperature=1.0, n=3, sampling_seed=7,
                                                   ignore_eos=True))
    assert len(outs) == 3
    assert all(o.cached_tokens == 0 for o in outs)  # the prompt was computed once, for all three
    before = engine.scheduler.stats.forward_tokens
    assert len({tuple(o.output_ids) for o in outs}) == 3
    again = engine.generate(prompt, SamplingParams(max_new_tokens=10, temperature=1.0, n=3, sampling_seed=7,
                                                    ignore_eos=True))
    assert sorted(o.output_ids for o in again) == sorted(o.output_ids for o in outs)
    # The second time the prompt is cached: it is computed for none of the three samples.
    assert all(o.cached_tokens == len(prompt) - 1 for o in again)
    assert engine.scheduler.stats.forward_tokens - before == 1 + 3 * 10
    engine.check_integrity()


def test_n_samples_come_in_sample_order_seeded_seed_plus_index(engine):
    prompt = list(range(200, 230))
    params = SamplingParams(max_new_tokens=8, temperature=1.0, ignore_eos=True)
    outs = engine.generate(prompt, replace(params, n=3, sampling_seed=40), rid="grp")
    assert [o.sample_index for o in outs] == [0, 1, 2]
    assert [o.rid for o in outs] == ["grp-0", "grp-1", "grp-2"]
    alone = [engine.generate(prompt, replace(params, sampling_seed=40 + i))[0] for i in range(3)]
    assert [o.output_ids for o in outs] == [o.output_ids for o in alone]
    assert [o.sample_index for o in alone] == [0, 0, 0]


def test_logprobs_match_hf(engine, tiny_models):
    from transformers import AutoModelForCausalLM

    params = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
    out = engine.generate(PROMPT, params, return_logprob=True, logprob_start_len=0, top_logprobs_num=3)[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    with torch.inference_mode():
        ids = torch.tensor([PROMPT + out.output_ids])
        ref = torch.log_softmax(hf(ids).logits[0].float(), dim=-1)
    # Prompt: the first token has no logprob; token p is scored by the logits at p - 1.
    assert out.input_token_logprobs[0] == (None, PROMPT[0])
    assert len(out.input_token_logprobs) == len(PROMPT)
    for p in range(1, len(PROMPT)):
        assert out.input_token_logprobs[p][0] == pytest.approx(float(ref[p - 1, PROMPT[p]]), abs=1e-4)
    for i, (lp, tid) in enumerate(out.output_token_logprobs):
        pos = len(PROMPT) - 1 + i
        assert lp == pytest.approx(float(ref[pos, tid]), abs=1e-4)
        top = out.output_top_logprobs[i]
        assert len(top) == 3 and top[0][0] == tid  # greedy picks the top-1
        assert [t for t, _ in top] == ref[pos].topk(3).indices.tolist()


@pytest.mark.parametrize("bad, param", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": 0}, "top_k"),
    ({"min_p": 2}, "min_p"), ({"max_new_tokens": -1}, "max_new_tokens"), ({"n": 0}, "n"),
    ({"stop": 3}, "stop"), ({"max_new_tokens": "x"}, "max_new_tokens"), ({"bogus": 1}, "bogus"),
    ({"min_new_tokens": 5, "max_new_tokens": 2}, "min_new_tokens"), ({"regex": 5}, "regex"),
    ({"regex": "a+", "ebnf": "root ::= \"a\""}, "ebnf"), ({"stop_regex": "a("}, "stop_regex"),
    ({"json_schema": 3}, "json_schema"),
])
def test_invalid_sampling_params_name_the_field(bad, param):
    with pytest.raises(InvalidParamError) as err:
        SamplingParams.from_dict(bad)
    assert err.value.param == param
    assert err.value.code == "invalid_value"


@pytest.mark.parametrize("prompt, params, param, code", [
    ([5] * 3000, SamplingParams(), "input_ids", "context_length_exceeded"),
    ([5, 10**6], SamplingParams(), "input_ids", "invalid_value"),
    ("", SamplingParams(), "input_ids", "invalid_value"),
    ([5], SamplingParams(logit_bias={10**6: 1.0}), "logit_bias", "invalid_value"),
])
def test_prepare_rejects_with_an_explicit_code(engine, prompt, params, param, code):
    with pytest.raises(InvalidParamError) as err:
        engine.prepare(prompt, params)
    assert (err.value.param, err.value.code) == (param, code)


def test_prepare_tokenizes_and_clips_once(engine):
    request = engine.prepare("Hello there", SamplingParams(max_new_tokens=10**6, min_new_tokens=10**6))
    assert request.input_ids == engine.tokenizer.encode("Hello there")
    limit = min(engine.context_length, engine.pool.size)
    assert request.params.max_new_tokens == request.params.min_new_tokens == limit - len(request.input_ids)


def test_random_sampling_respects_top_k(engine):
    # With top_k=2 every sampled token must be one of the two most likely under the model.
    out = engine.generate(PROMPT, SamplingParams(max_new_tokens=8, temperature=1.0, top_k=2, sampling_seed=3,
                                                 ignore_eos=True), return_logprob=True, top_logprobs_num=2)[0]
    for (_, tid), top in zip(out.output_token_logprobs, out.output_top_logprobs):
        assert tid in [t for t, _ in top]
