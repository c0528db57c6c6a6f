"""`sglang-gw bench`: load tests for any OpenAI-compatible or SGLang-native server (our gateway, one
engine, vLLM, SGLang): workloads (workloads.py), the HTTP client (client.py), closed and open loops
(runner.py), the JSON result, comparisons and the PNG (report.py), the flags (command.py), and a fake
server that measures the client itself (fake_server.py). Nothing is imported here: `sglang-gw` builds the
bench flags for every command, and the client's imports would slow them all."""
