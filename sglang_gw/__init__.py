"""sglang-gw: a supervisor, radix-cached inference engines, and a cache-aware gateway in one program."""

__version__ = "0.1.0"
