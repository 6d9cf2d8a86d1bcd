"""Chat templates: the checkpoint's own wins, the built-in one renders Gemma 4's turn format."""

from __future__ import annotations

import pytest

from mlx_gemma4 import load
from mlx_gemma4.processing.chat_template import BUILTIN_TEMPLATE

CONVERSATIONS = {
    "system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "image"}]},
    ],
}

# A checkpoint's own template that differs visibly from the built-in one.
CUSTOM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    "{% if enable_thinking %}(think){% endif %}{% if add_generation_prompt %}[model]{% endif %}"
)


def transformers_render(folder, messages, template=None, **kwargs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True, **kwargs
    )


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_builtin_template_renders_like_transformers(chat_checkpoint, conversation, thinking):
    folder, _ = chat_checkpoint()
    _, processor = load(folder)
    messages = CONVERSATIONS[conversation]
    ours = processor.apply_chat_template(messages, enable_thinking=thinking)
    assert ours == transformers_render(folder, messages, BUILTIN_TEMPLATE, enable_thinking=thinking)


def test_builtin_template_format():
    from jinja2 import Environment

    render = Environment().from_string(BUILTIN_TEMPLATE).render
    text = render(messages=CONVERSATIONS["system"], bos_token="<bos>", add_generation_prompt=True)
    # thinking off: the generation prompt ends with an empty thought channel
    assert text == (
        "<bos><|turn>system\nYou are terse.<turn|>\n<|turn>user\nHi<turn|>\n"
        "<|turn>model\n<|channel>thought\n<channel|>"
    )
    text = render(messages=CONVERSATIONS["multi_turn"], bos_token="<bos>", enable_thinking=True)
    assert text == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n"
        "<|turn>model\nHello!<turn|>\n<|turn>user\nDescribe\n\n<|image|>\n\n<turn|>\n"
    )


def test_checkpoint_template_wins(chat_checkpoint):
    folder, _ = chat_checkpoint("ple_kv_shared", CUSTOM_TEMPLATE)
    _, processor = load(folder)
    assert processor.has_own_template
    messages = CONVERSATIONS["system"]
    ours = processor.apply_chat_template(messages, enable_thinking=True)
    assert ours == "<bos>[system]You are terse.[user]Hi(think)[model]"
    assert ours == transformers_render(folder, messages, enable_thinking=True)


def test_earlier_thoughts_are_dropped_from_history(chat_checkpoint):
    _, processor = load(chat_checkpoint()[0])
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<|channel>thought\nadd them<channel|>4"},
        {"role": "user", "content": "3+3?"},
    ]
    text = processor.apply_chat_template(messages, enable_thinking=True)
    assert "add them" not in text and "<|turn>model\n4<turn|>" in text
