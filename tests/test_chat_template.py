"""The gateway renders chat templates with jinja2 alone: the text must equal what the engine's
tokenizer (transformers' apply_chat_template) renders, or routing would match the wrong prefixes."""

from __future__ import annotations

import jinja2
import pytest

from sglang_gw.gateway.chat_template import load_chat_template

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Réponds en français 🙂"}, {"role": "user", "content": "你好"},
     {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "Et <b>ensuite</b> ?"}],
]

# Templates that use what transformers adds to jinja2: tojson without HTML escaping, loop controls,
# namespace, the special tokens, raise_exception, and the {% generation %} tag.
TEMPLATES = {
    "tojson-and-tokens": "{{ bos_token }}{% for m in messages %}{{ m | tojson }}{{ eos_token }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}",
    "loop-controls-namespace": "{% set ns = namespace(turns=0) %}{% for m in messages %}"
                               "{% if m.role == 'system' %}{% continue %}{% endif %}{% set ns.turns = ns.turns + 1 %}"
                               "[{{ ns.turns }}:{{ m.role }}] {{ m.content }}\n{% if ns.turns > 2 %}{% break %}"
                               "{% endif %}{% endfor %}",
    "generation-tag": "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
                      "{% endgeneration %}{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}",
    "whitespace-control": "{% for m in messages %}\n  {{- m.role }}\n    {% if m.content %}{{ m.content }}{% endif %}\n"
                          "{% endfor %}",
}


def _hf(model_dir, messages):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).apply_chat_template(messages, tokenize=False,
                                                                          add_generation_prompt=True)


def _with_template(tiny_dir, tmp_path, source: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.chat_template = source
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_templates_render_as_transformers_renders_them(name, tiny_models, tmp_path):
    model_dir = _with_template(tiny_models["llama"], tmp_path, TEMPLATES[name])
    template = load_chat_template(model_dir)
    for messages in CONVERSATIONS:
        assert template.render(messages) == _hf(model_dir, messages)


def test_the_tiny_models_template_and_a_refusing_template(tiny_models, tmp_path):
    assert load_chat_template(tiny_models["llama"]).render(CONVERSATIONS[1]) == _hf(tiny_models["llama"],
                                                                                     CONVERSATIONS[1])
    refusing = _with_template(tiny_models["llama"], tmp_path,
                              "{% if messages[0].role != 'system' %}{{ raise_exception('system first') }}{% endif %}")
    with pytest.raises(jinja2.TemplateError, match="system first"):
        load_chat_template(refusing).render(CONVERSATIONS[0])
    assert load_chat_template(tmp_path / "no-such-dir") is None


@pytest.mark.slow
def test_the_embedded_models_template(smollm2_dir):
    template = load_chat_template(smollm2_dir)
    for messages in CONVERSATIONS:
        assert template.render(messages) == _hf(smollm2_dir, messages)
