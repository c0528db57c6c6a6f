"""Engine settings: one frozen dataclass, validated at construction (field name + reason on error)."""

from __future__ import annotations

from dataclasses import dataclass

from .scheduler import SchedulerConfig

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"


@dataclass(frozen=True)
class EngineConfig:
    model: str = DEFAULT_MODEL
    device: str = "cpu"  # "cpu", "cuda", "cuda:N"
    dtype: str = "auto"  # auto = float32 on CPU (CPU bf16 matmuls are slow), bfloat16 on CUDA
    # KV pool sizing: an explicit token count wins; else a byte budget on CPU, a memory fraction on CUDA.
    max_total_tokens: int | None = None
    kv_cache_bytes: int = 1 << 30
    mem_fraction_static: float = 0.85  # CUDA: weights + KV may use this fraction of the GPU's memory
    context_length: int | None = None  # default: the model's max_position_embeddings
    max_running_requests: int = 64
    chunked_prefill_size: int = 2048
    max_prefill_tokens: int = 16384
    schedule_policy: str = "fcfs"
    batch_log_interval: float = 5.0  # seconds between SGLang-style batch log lines
    disable_radix_cache: bool = False
    attention_backend: str = "auto"  # auto = "cpu" (staged decode) on CPU, "torch" (reference) on CUDA
    num_threads: int | None = None  # torch intra-op threads for this process (None: torch's default)

    def __post_init__(self):
        checks = [
            ("dtype", self.dtype in ("auto", "float32", "bfloat16", "float16"),
             "must be auto, float32, bfloat16 or float16"),
            ("device", self.device == "cpu" or self.device.startswith("cuda"), "must be cpu, cuda or cuda:N"),
            ("max_total_tokens", self.max_total_tokens is None or self.max_total_tokens >= 1, "must be >= 1"),
            ("kv_cache_bytes", self.kv_cache_bytes >= 1, "must be >= 1"),
            ("mem_fraction_static", 0 < self.mem_fraction_static < 1, "must be in (0, 1)"),
            ("context_length", self.context_length is None or self.context_length >= 2, "must be >= 2"),
            ("num_threads", self.num_threads is None or self.num_threads >= 1, "must be >= 1"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name}: {why} (got {getattr(self, name)!r})")
        self.scheduler_config()  # validates the scheduler's fields

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(
            max_running_requests=self.max_running_requests,
            chunked_prefill_size=self.chunked_prefill_size,
            max_prefill_tokens=self.max_prefill_tokens,
            schedule_policy=self.schedule_policy,
            batch_log_interval=self.batch_log_interval,
        )
