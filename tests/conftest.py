"""Shared fixtures: tiny random-weight Llama / Qwen2 / Qwen3 models built in-process, a tiny Qwen2 with the
real 151k Qwen vocabulary (qwen_vocab_model), and the embedded SmolLM2 model (converted once into the
repo-local cache)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from sglang_gw.testing import free_port, free_port_range, http_json, log_events, stop_process, wait_http  # noqa: F401 — tests import these from here

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("SGLANG_GW_CACHE", str(REPO / ".cache"))

import torch  # noqa: E402

torch.set_num_threads(2)

TINY_VOCAB = 512
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Radix attention reuses the key-value cache of shared prefixes across requests.",
    "Continuous batching lets requests join and leave between steps of the model.",
    "Héllo wörld, ünïcödé text with emoji 🙂 and CJK 你好世界 characters.",
    "def add(a, b):\n    return a + b\n",
    "Paris is the capital of France; Berlin is the capital of Germany.",
]


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>", unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def build_tiny_model(family: str, path: Path, tokenizer=None, **overrides) -> Path:
    """A 2-layer random-weight model saved in HF format with `tokenizer` (default: the small BPE tokenizer,
    whose 468 ids sit in a 512-row embedding); the eos/bos/pad ids, and vocab_size when a tokenizer is
    given, come from the tokenizer."""
    import transformers

    tok = tokenizer if tokenizer is not None else _tiny_tokenizer()
    common = dict(
        vocab_size=TINY_VOCAB if tokenizer is None else len(tok), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        rms_norm_eps=1e-6, initializer_range=0.08, eos_token_id=tok.eos_token_id,
        # Qwen's tokenizer has no bos token; its config names <|endoftext|> (the pad token), as Qwen2's does.
        bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else tok.pad_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if family == "llama":
        cfg = transformers.LlamaConfig(
            **common, tie_word_embeddings=False, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 256},
        )
        cls = transformers.LlamaForCausalLM
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=10000.0)
        cls = transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False, rope_theta=1000000.0)
        cls = transformers.Qwen3ForCausalLM
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed({"llama": 1, "qwen2": 2, "qwen3": 3}[family])
    model = cls(cfg).to(torch.float32).eval()
    if family == "qwen2":  # HF initialises biases to zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {f: build_tiny_model(f, root / f) for f in ("llama", "qwen2", "qwen3")}


@pytest.fixture(scope="session")
def qwen_vocab_model(tmp_path_factory) -> Path:
    """A tiny random-weight Qwen2 model (hidden 64, 2 layers) with the real 151,646-id Qwen tokenizer,
    converted from the `dashscope` wheel's qwen.tiktoken (tests/qwen_tokenizer.py); skipped without it."""
    from qwen_tokenizer import QwenTiktokenMissing, build_qwen_tokenizer

    try:
        tok = build_qwen_tokenizer(Path(os.environ["SGLANG_GW_CACHE"]))
    except QwenTiktokenMissing as exc:
        pytest.skip(str(exc))
    return build_tiny_model("qwen2", tmp_path_factory.mktemp("qwen-vocab") / "qwen2-151k", tokenizer=tok)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from sglang_gw.engine.models.builtin import import_builtin

    return import_builtin("builtin:smollm2-135m-instruct")


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Reference: HF transformers generate, one prompt at a time (no padding), float32, greedy, no EOS stop."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            gen = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )
            outs.append(gen[0, len(ids):].tolist())
    return outs


class EngineProcess:
    """A real `sglang-gw engine` process on a free port; `url` is its base address."""

    def __init__(self, model: str, *extra: str, threads: int = 1):
        import subprocess
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(os.environ["SGLANG_GW_CACHE"]) / f"engine-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sglang_gw.cli", "engine", "--model", model, "--port", str(self.port),
             "--num-threads", str(threads), "--log-format", "json", *extra],
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 120.0) -> "EngineProcess":
        try:
            wait_http(self.url + "/health", self.proc, timeout)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}:\n{self.log_path.read_text()[-3000:]}") from None
        return self

    def __enter__(self) -> "EngineProcess":
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> int:
        code = stop_process(self.proc)
        self._log.close()
        return code


@contextlib.contextmanager
def engine_fleet(count: int, model: str, *extra: str):
    """`count` engine processes started together (they load in parallel), stopped together."""
    procs = [EngineProcess(model, *extra) for _ in range(count)]
    try:
        yield [p.wait_ready() for p in procs]
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="session")
def tiny_server(tiny_models):
    """One engine process on the tiny Llama model, shared by the HTTP tests (served name "tiny")."""
    with EngineProcess(str(tiny_models["llama"]), "--served-model-name", "tiny", "--max-total-tokens", "20000") as server:
        yield server


class ServeProcess:
    """A real `sglang-gw serve` process tree on free ports; `url` is the gateway's address."""

    def __init__(self, config: str | dict, tmp_path: Path, *sets: str, env: dict | None = None,
                 key: str | None = None):
        import subprocess
        import sys

        import yaml

        if isinstance(config, dict):
            path = tmp_path / "serve.yaml"
            path.write_text(yaml.safe_dump(config))
            config = str(path)
        self.config_path = Path(config)
        self.key = key  # sent on get() when the config has API keys
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"serve-{self.port}.log"
        self.out_path = tmp_path / f"serve-{self.port}.out"
        self._log, self._out = open(self.log_path, "w"), open(self.out_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sglang_gw", "serve", config, "--set", f"gateway.port={self.port}",
             "--set", "logging.format=json", *sets],
            stdout=self._out, stderr=self._log, env=dict(os.environ, **(env or {})))

    def get(self, path: str, key: str | None = None) -> tuple[int, dict]:
        key = key or self.key
        return http_json(self.url + path, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=5)

    def reload(self, config: dict) -> None:
        """Write `config` over the config file, SIGHUP, and wait until serve has applied it."""
        import signal

        import yaml

        before = self.count_events("serve.reloaded")
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc.send_signal(signal.SIGHUP)
        self.wait_for(lambda: self.count_events("serve.reloaded") > before, 30, "the reload")

    def engines(self) -> dict[str, dict]:
        return {e["name"]: e for e in self.get("/engines")[1]["engines"]}

    def wait_for(self, predicate, timeout: float = 120.0, what: str = "condition"):
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")
            try:
                value = predicate()
            except OSError:
                value = None
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"{what} not reached after {timeout}s:\n{self.logs()[-4000:]}")

    def wait_all_ready(self, timeout: float = 120.0) -> dict[str, dict]:
        return self.wait_for(lambda: (lambda e: e if all(x["phase"] == "ready" for x in e.values()) else None)(
            self.engines()), timeout, "every engine ready")

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def count_events(self, event: str, logs: str | None = None) -> int:
        """How many log lines (of `logs`, else all so far) are the event `event`."""
        return sum(e.get("event") == event for e in log_events(self.logs() if logs is None else logs))

    def stop(self, timeout: float = 90) -> int:
        code = stop_process(self.proc, timeout)
        self._log.close()
        self._out.close()
        return code


def process_gone(pid: int) -> bool:
    """True once pid has exited (a zombie not yet reaped by init counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")
