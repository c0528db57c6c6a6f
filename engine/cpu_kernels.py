"""Our C++ CPU kernels (engine/kernels/*.cpp), compiled on first use and cached per machine.

torch's extension builder compiles them with the machine's C++ compiler (~40 s, once; later loads take
well under a second) into $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions). The build targets
the CPU's vector ISA, named in the extension so that a cache shared between machines never loads a
build for another ISA. Where no compiler works, `load` raises KernelUnavailable saying why.
"""

from __future__ import annotations

import functools
import hashlib
import time
from pathlib import Path

import structlog
import torch

log = structlog.get_logger(__name__)

SOURCES = Path(__file__).parent / "kernels"


class KernelUnavailable(RuntimeError):
    pass


def cpu_has(feature: str) -> bool:
    """torch's own probe of this CPU, e.g. "avx2", "avx512_bf16", "amx_tile" (absent in old torch: no)."""
    return bool(getattr(torch.cpu, f"_is_{feature}_supported", lambda: False)())


def _isa_flags() -> tuple[str, list[str]]:
    if cpu_has("avx512"):
        return "avx512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
    if cpu_has("avx2"):
        return "avx2", ["-mavx2", "-mfma"]
    return "base", []


@functools.cache
def load(name: str):
    """The compiled module of kernels/<name>.cpp (built once per machine, source and ISA)."""
    source = SOURCES / f"{name}.cpp"
    isa, isa_flags = _isa_flags()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    from torch.utils.cpp_extension import load as build

    started = time.perf_counter()
    log.info("engine.kernel_loading", kernel=name, isa=isa, note="the first load on a machine compiles (~40 s)")
    try:
        module = build(name=f"sglang_gw_{name}_{isa}_{digest}", sources=[str(source)], verbose=False,
                       extra_cflags=["-O3", "-ffast-math", "-fopenmp", *isa_flags], extra_ldflags=["-fopenmp"])
    except Exception as exc:  # no compiler, no headers, a failed build: the caller picks another path
        raise KernelUnavailable(f"could not build the {name} kernel: {exc}") from exc
    log.info("engine.kernel_loaded", kernel=name, seconds=round(time.perf_counter() - started, 1))
    return module
