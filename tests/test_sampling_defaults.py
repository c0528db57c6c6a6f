"""Sampling defaults: what a request leaves unset comes from the model's generation_config.json (SGLang's
`--sampling-defaults model`), explicit values always win, and `sampling_defaults: openai` ignores the file."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import EngineProcess, http_json
from sglang_gw.engine import Engine, SamplingParams
from sglang_gw.engine.models.config import read_sampling_defaults
from sglang_gw.engine.protocol import ChatCompletionRequest, parse, sampling_params

MODEL_DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1}
PROMPT = [5, 17, 99, 250, 3, 8, 42]
README_QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def write_generation_config(model_dir: Path, **keys) -> None:
    path = model_dir / "generation_config.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**current, **keys}))


@pytest.fixture(scope="module")
def greedy_by_default_model(tiny_models, tmp_path_factory) -> Path:
    """The tiny Llama with a generation_config.json that says greedy (HF: do_sample false beats temperature)."""
    model_dir = tmp_path_factory.mktemp("greedy-by-default") / "llama"
    shutil.copytree(tiny_models["llama"], model_dir)
    write_generation_config(model_dir, do_sample=False, temperature=0.7)
    return model_dir


# ---- the params ---------------------------------------------------------------------------------


def test_explicit_fields_win_and_unset_ones_take_the_models_defaults():
    params = SamplingParams.from_dict({"temperature": 1.0, "top_k": 5}).with_defaults(MODEL_DEFAULTS)
    assert (params.temperature, params.top_k) == (1.0, 5)
    assert (params.top_p, params.min_p, params.repetition_penalty) == (0.8, 0.05, 1.1)
    assert SamplingParams.from_dict({"temperature": 0}).with_defaults(MODEL_DEFAULTS).temperature == 0
    # Constructor keywords are explicit too, and stay so through replace; what is left open stays open.
    params = replace(SamplingParams(temperature=1.0, max_new_tokens=4), n=2).with_defaults(MODEL_DEFAULTS)
    assert (params.temperature, params.top_p, params.max_new_tokens, params.n) == (1.0, 0.8, 4, 2)
    # Without model defaults, the fallbacks (SGLang's and OpenAI's), as plain values.
    fallbacks = SamplingParams().with_defaults({})
    assert [(type(getattr(fallbacks, k)), getattr(fallbacks, k)) for k in MODEL_DEFAULTS] == [
        (float, 1.0), (float, 1.0), (int, -1), (float, 0.0), (float, 1.0)]


def test_openai_fields_left_out_or_null_are_unset():
    def resolved(body: dict) -> SamplingParams:
        request = parse(ChatCompletionRequest, {"messages": README_QUESTION, **body})
        return sampling_params(request.sampling_dict(16, {})).with_defaults(MODEL_DEFAULTS)

    assert resolved({}).temperature == 0.7 and resolved({}).top_k == 20
    assert resolved({"temperature": None, "top_p": None}).top_p == 0.8
    explicit = resolved({"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0})
    assert [getattr(explicit, k) for k in MODEL_DEFAULTS] == [1.0, 1.0, -1, 0.0, 1.0]


def test_reading_generation_config(tmp_path):
    assert read_sampling_defaults(tmp_path) == {}
    write_generation_config(tmp_path, bos_token_id=1, temperature=0.6, top_p=0.9, max_new_tokens=64)
    assert read_sampling_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.9}
    # HF generate: do_sample false is greedy whatever temperature says; top_k 0 is no top-k.
    write_generation_config(tmp_path, do_sample=False, top_k=0)
    defaults = read_sampling_defaults(tmp_path)
    assert defaults == {"temperature": 0.0, "top_p": 0.9, "top_k": -1} and type(defaults["top_k"]) is int
    write_generation_config(tmp_path, top_p=1.5)
    with pytest.raises(ValueError, match=r"generation_config\.json: top_p"):
        read_sampling_defaults(tmp_path)


def test_the_engine_applies_the_file_unless_told_openai(greedy_by_default_model):
    for setting, temperature in (("model", 0.0), ("openai", 1.0)):
        with Engine(model=str(greedy_by_default_model), max_total_tokens=1024, num_threads=1,
                    sampling_defaults=setting) as engine:
            assert engine.resolved_settings["default_sampling_params"]["temperature"] == temperature
            assert engine.prepare(PROMPT).params.temperature == temperature
            assert engine.prepare(PROMPT, SamplingParams(temperature=0.5)).params.temperature == 0.5


# ---- over HTTP ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def greedy_server(greedy_by_default_model):
    with EngineProcess(str(greedy_by_default_model), "--served-model-name", "greedy",
                       "--max-total-tokens", "4096") as server:
        yield server


def post(server, path: str, body: dict) -> dict:
    status, out = http_json(server.url + path, json.dumps(body).encode())
    assert status == 200, out
    return out


def test_requests_without_temperature_use_the_models_greedy_default(greedy_server):
    info = http_json(greedy_server.url + "/get_server_info")[1]
    assert info["sampling_defaults"] == "model" and info["default_sampling_params"]["temperature"] == 0.0

    def native(**sampling) -> list[int]:
        body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 16, "ignore_eos": True, **sampling}}
        return post(greedy_server, "/generate", body)["output_ids"]

    greedy = native(temperature=0)
    assert native() == native() == greedy
    # An explicit temperature still samples: two seeds, two different continuations.
    assert native(temperature=1.0, sampling_seed=1) != native(temperature=1.0, sampling_seed=2)

    def chat(**fields) -> str:
        body = {"model": "greedy", "messages": README_QUESTION, "max_tokens": 16, "ignore_eos": True, **fields}
        return post(greedy_server, "/v1/chat/completions", body)["choices"][0]["message"]["content"]

    assert chat() == chat() == chat(temperature=0)

    def complete(**fields) -> str:
        body = {"model": "greedy", "prompt": PROMPT, "max_tokens": 16, "ignore_eos": True, **fields}
        return post(greedy_server, "/v1/completions", body)["choices"][0]["text"]

    assert complete() == complete() == complete(temperature=0)


# ---- the embedded model -------------------------------------------------------------------------


@pytest.mark.slow
def test_the_embedded_model_answers_the_readme_question_with_its_defaults(smollm2_dir):
    """The README's chat request, no temperature: the import's generation_config.json makes it answer."""
    assert json.loads((smollm2_dir / "generation_config.json").read_text())["do_sample"] is False
    with EngineProcess("builtin:smollm2-135m-instruct", "--served-model-name", "smollm2") as server:
        # n = 10 samples with seeds 0, 1, ..., 9.
        out = post(server, "/v1/chat/completions",
                   {"model": "smollm2", "messages": README_QUESTION, "max_tokens": 30, "n": 10, "seed": 0})
    answers = [choice["message"]["content"] for choice in out["choices"]]
    assert len(answers) == 10 and sum("Paris" in answer for answer in answers) >= 9, answers
