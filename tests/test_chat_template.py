"""The bounded chat-template renderer renders real templates exactly as plain Jinja does, with
the globals Hugging Face templates use; what it refuses is in tests/test_bad_inputs.py."""

from __future__ import annotations

import sys

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mlxkit.chat_template import MAX_STEPS, ChatTemplate
from mlxkit.errors import CheckpointError
from mlxkit.tokenizer_build import CHAT_TEMPLATE

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Grüße, 世界?"},
    {"role": "assistant", "content": "<think>\nhm\n</think>\n\nHello."},
    {"role": "user", "content": "Again"},
]


@pytest.mark.parametrize("thinking", [True, False])
def test_qwen_template_renders_as_plain_jinja(thinking):
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    kw = {"messages": CONVERSATION, "add_generation_prompt": True, "enable_thinking": thinking}
    want = plain.from_string(CHAT_TEMPLATE).render(**kw)
    assert ChatTemplate(CHAT_TEMPLATE).render(**kw) == want
    assert want.count("<|im_start|>") == 5


def test_hugging_face_globals():
    t = ChatTemplate(
        "{% for m in messages %}{% if loop.index0 == 1 %}{% break %}{% endif %}"
        "{{ m | tojson }}{% endfor %}"
    )
    assert t.render(messages=CONVERSATION) == '{"role": "system", "content": "Be brief."}'
    assert ChatTemplate("{{ 'ü' | tojson }}").render() == '"ü"'
    with pytest.raises(CheckpointError, match="tools are not supported"):
        ChatTemplate("{{ raise_exception('tools are not supported') }}").render()


def test_a_long_conversation_is_within_the_step_budget():
    messages = [{"role": ("user", "assistant")[i % 2], "content": f"m{i}"} for i in range(5000)]
    text = ChatTemplate(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    assert text.count("<|im_end|>") == 5000
    assert MAX_STEPS >= 5000 * 20


def test_the_callers_trace_function_is_restored():
    def tracer(frame, event, arg):
        return None

    sys.settrace(tracer)
    try:
        ChatTemplate("{{ 1 }}").render()
        with pytest.raises(CheckpointError):
            ChatTemplate("{{ 1 / 0 }}").render()
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(None)
