"""The built-in Gemma 4 chat template, for checkpoints that ship none, and history clean-up.

Checkpoints' own templates (`chat_template.jinja`, or `chat_template` in tokenizer_config.json)
always win. This one renders the documented turn format: a system turn (opened by `<|think|>`
when thinking is on), `<|turn>ROLE ... <turn|>` turns with `assistant` written as `model`, media
placeholders for content parts, and the `<|turn>model` generation prompt.
"""

from __future__ import annotations

import re
from typing import Any

BUILTIN_TEMPLATE = r"""{{- bos_token -}}
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content | trim -}}
    {%- else -%}
        {%- for part in content -%}
            {%- if part['type'] == 'text' -%}
                {{- part['text'] | trim -}}
            {%- elif part['type'] == 'image' -%}
                {{- '<|image|>' -}}
            {%- elif part['type'] == 'audio' -%}
                {{- '<|audio|>' -}}
            {%- elif part['type'] == 'video' -%}
                {{- '<|video|>' -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- set thinking = enable_thinking is defined and enable_thinking -%}
{%- set has_system = messages and messages[0]['role'] in ['system', 'developer'] -%}
{%- if thinking or has_system -%}
    {{- '<|turn>system\n' -}}
    {%- if thinking -%}
        {{- '<|think|>\n' -}}
    {%- endif -%}
    {%- if has_system -%}
        {{- render_content(messages[0]['content']) -}}
    {%- endif -%}
    {{- '<turn|>\n' -}}
{%- endif -%}
{%- for message in (messages[1:] if has_system else messages) -%}
    {{- '<|turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' -}}
    {{- render_content(message['content']) -}}
    {{- '<turn|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|turn>model\n' -}}
{%- endif -%}
"""

THOUGHT = re.compile(r"<\|channel>.*?<channel\|>", re.DOTALL)


def drop_thoughts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Earlier turns' thoughts never go back to the model: strip them from assistant turns."""
    cleaned = []
    for message in messages:
        content = message.get("content")
        if message.get("role") in ("assistant", "model") and isinstance(content, str):
            message = {**message, "content": THOUGHT.sub("", content).lstrip()}
        cleaned.append(message)
    return cleaned
