"""The gateway: cache-aware, load-bounded routing of OpenAI / SGLang requests over engine workers."""
