"""The built-in Gemma 4 chat template, for checkpoints that ship none, and history clean-up.

Checkpoints' own templates (`chat_template.jinja`, or `chat_template` in tokenizer_config.json)
always win. This one renders, byte for byte, what Google's instruction-tuned template (the
interleaved-thinking revision) renders:

- a system turn, opened when thinking is on, tools are given or the first message is a system or
  developer message: `<|think|>` first, then the system text, then one
  `<|tool>declaration:NAME{...}<tool|>` per tool (types upper-cased, keys sorted, strings in
  `<|"|>` quotes);
- `<|turn>ROLE ... <turn|>` turns, `assistant` written as `model`; a model turn's thoughts are
  dropped, except the `reasoning_content` of tool-calling turns after the last user turn;
- tool calls as `<|tool_call>call:NAME{key:value,...}<tool_call|>` and tool responses (a
  message's `tool_responses`) as `<|tool_response>response:NAME{...}<tool_response|>` inside the
  model turn, which stays open so that the model answers (or calls again) in the same turn;
- media parts as `<|image|>`, `<|audio|>` and `<|video|>` placeholders;
- the generation prompt `<|turn>model` (unless the turn is still open after tool responses),
  followed by an empty thought channel when thinking is off.

The template's quirks (a missing comma before `type` in object properties, property names that
collide with schema keywords being skipped, Python spellings of `None` and floats) are kept on
purpose: the checkpoint was trained on what Google's template renders.
"""

from __future__ import annotations

import re
from typing import Any

BUILTIN_TEMPLATE = r"""
{#- A string in Gemma's quotes. -#}
{%- macro quoted(text) -%}
    {{- '<|"|>' ~ text ~ '<|"|>' -}}
{%- endmacro -%}

{#- A JSON-like value in Gemma's syntax; mapping keys are quoted unless quote_keys is false. -#}
{%- macro value(v, quote_keys=true) -%}
    {%- if v is string -%}
        {{- quoted(v) -}}
    {%- elif v is boolean -%}
        {{- 'true' if v else 'false' -}}
    {%- elif v is mapping -%}
        {{- '{' -}}
        {%- for key, item in v | dictsort -%}
            {{- quoted(key) if quote_keys else key -}}:{{- value(item, quote_keys) -}}
            {{- ',' if not loop.last -}}
        {%- endfor -%}
        {{- '}' -}}
    {%- elif v is sequence -%}
        {{- '[' -}}
        {%- for item in v -%}
            {{- value(item, quote_keys) -}}{{- ',' if not loop.last -}}
        {%- endfor -%}
        {{- ']' -}}
    {%- else -%}
        {{- v -}}
    {%- endif -%}
{%- endmacro -%}

{%- macro string_list(items) -%}
    {{- '[' -}}
    {%- for item in items -%}
        {{- quoted(item) -}}{{- ',' if not loop.last -}}
    {%- endfor -%}
    {{- ']' -}}
{%- endmacro -%}

{#- The `items` schema of an array property: its fields in key order, nulls left out. -#}
{%- macro item_fields(items) -%}
    {%- for key, field in items | dictsort if field is not none -%}
        {%- if key == 'properties' -%}
            {{- 'properties:{' -}}
            {{- properties_of(field) if field is mapping -}}
            {{- '}' -}}
        {%- elif key == 'required' -%}
            {{- 'required:' ~ string_list(field) -}}
        {%- elif key == 'type' -%}
            {%- set types = field | upper if field is string else field | map('upper') | list -%}
            {{- 'type:' ~ value(types) -}}
        {%- else -%}
            {{- key ~ ':' ~ value(field) -}}
        {%- endif -%}
        {{- ',' if not loop.last -}}
    {%- endfor -%}
{%- endmacro -%}

{#- Property schemas in name order; names that are schema keywords are skipped. -#}
{%- macro properties_of(properties) -%}
    {%- set keywords = ['description', 'type', 'properties', 'required', 'nullable'] -%}
    {%- for name, spec in properties | dictsort if name not in keywords -%}
        {%- set type = spec['type'] | upper -%}
        {%- set leading =
            (['description:' ~ quoted(spec['description'])] if spec['description'] else [])
            + (['nullable:true'] if spec['nullable'] else [])
            + (['enum:' ~ value(spec['enum'])] if type == 'STRING' and spec['enum'] else []) -%}
        {{- name ~ ':{' ~ leading | join(',') -}}
        {%- if type == 'OBJECT' -%}
            {#- Google's template writes these with a leading comma, even as the first field. -#}
            {{- ',properties:{' -}}
            {{- properties_of(spec['properties'] if spec['properties'] is mapping else spec) -}}
            {{- '}' -}}
            {{- ',required:' ~ string_list(spec['required']) if spec['required'] -}}
        {%- elif type == 'ARRAY' and spec['items'] is mapping and spec['items'] -%}
            {{- ',items:{' ~ item_fields(spec['items']) ~ '}' -}}
        {%- endif -%}
        {{- ',' if leading -}}
        {{- 'type:' ~ quoted(type) ~ '}' -}}
        {{- ',' if not loop.last -}}
    {%- endfor -%}
{%- endmacro -%}

{%- macro declaration(function) -%}
    {{- 'declaration:' ~ function['name'] ~ '{description:' ~ quoted(function['description']) -}}
    {%- set parameters = function['parameters'] -%}
    {%- if parameters -%}
        {{- ',parameters:{' -}}
        {%- if parameters['properties'] -%}
            {{- 'properties:{' ~ properties_of(parameters['properties']) ~ '},' -}}
        {%- endif -%}
        {{- 'required:' ~ string_list(parameters['required']) ~ ',' if parameters['required'] -}}
        {{- 'type:' ~ quoted(parameters['type'] | upper) ~ '}' if parameters['type'] -}}
    {%- endif -%}
    {%- if 'response' in function -%}
        {%- set response = function['response'] -%}
        {{- ',response:{' -}}
        {{- 'description:' ~ quoted(response['description']) ~ ',' if response['description'] -}}
        {{- 'type:<|"|>OBJECT<|"|>}' if response['type'] | upper == 'OBJECT' -}}
    {%- endif -%}
    {{- '}' -}}
{%- endmacro -%}

{#- A model turn's text without its thought channels (an unclosed one runs to the end). -#}
{%- macro without_thoughts(text) -%}
    {%- set kept = namespace(text='') -%}
    {%- for piece in text.split('<channel|>') -%}
        {%- set kept.text = kept.text ~ piece.split('<|channel>')[0] -%}
    {%- endfor -%}
    {{- kept.text | trim -}}
{%- endmacro -%}

{%- macro text_of(text, role) -%}
    {{- without_thoughts(text) if role == 'model' else text | trim -}}
{%- endmacro -%}

{%- set media = {'image': '

<|image|>

', 'audio': '<|audio|>', 'video': '

<|video|>

'} -%}
{%- set thinking = enable_thinking is defined and enable_thinking -%}
{%- set has_system = messages[0]['role'] in ['system', 'developer'] -%}
{%- set conversation = messages[1:] if has_system else messages -%}

{{- bos_token -}}
{%- if thinking or tools or has_system -%}
    {{- '<|turn>system
' -}}
    {{- '<|think|>
' if thinking -}}
    {{- messages[0]['content'] | trim if has_system -}}
    {%- for tool in tools or [] -%}
        {{- '<|tool>' ~ declaration(tool['function']) ~ '<tool|>' -}}
    {%- endfor -%}
    {{- '<turn|>
' -}}
{%- endif -%}

{#- After tool responses the model turn stays open: the model continues it. -#}
{%- set turn = namespace(open=false) -%}
{%- for message in conversation -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {%- set content = message['content'] -%}
    {%- set parts = content if content is not string and content is sequence else [] -%}
    {%- if not (turn.open and message['tool_calls']) -%}
        {{- '<|turn>' ~ role ~ '
' -}}
    {%- endif -%}

    {%- if message['tool_calls'] -%}
        {%- set later_users = conversation[loop.index0:] | selectattr('role', 'equalto', 'user') -%}
        {%- set after_last_user = not (later_users | list) -%}
        {%- if message['reasoning_content'] and after_last_user -%}
            {{- '<|channel>thought
' ~ message['reasoning_content'] ~ '<channel|>' -}}
        {%- endif -%}
        {%- for call in message['tool_calls'] -%}
            {%- set arguments = call['function']['arguments'] -%}
            {{- '<|tool_call>call:' ~ call['function']['name'] -}}
            {%- if arguments is mapping -%}
                {{- value(arguments, false) -}}
            {%- else -%}
                {{- '{' ~ (arguments if arguments is string else '') ~ '}' -}}
            {%- endif -%}
            {{- '<tool_call|>' -}}
        {%- endfor -%}
    {%- endif -%}

    {%- for response in message['tool_responses'] or [] -%}
        {%- set payload = response['response'] -%}
        {{- '<|tool_response>response:' ~ response['name'] | default('unknown') -}}
        {{- value(payload if payload is mapping else {'value': payload}, false) -}}
        {{- '<tool_response|>' -}}
    {%- endfor -%}

    {%- if content is string -%}
        {{- text_of(content, role) -}}
    {%- endif -%}
    {%- for part in parts -%}
        {{- text_of(part['text'], role) if part['type'] == 'text' else media[part['type']] -}}
    {%- endfor -%}

    {%- set media_parts = parts | selectattr('type', 'in', media) | list -%}
    {%- set turn.open = message['tool_responses'] and not media_parts -%}
    {%- if not (message['tool_responses'] and not content) -%}
        {{- '<turn|>
' -}}
    {%- endif -%}
{%- endfor -%}

{%- if add_generation_prompt -%}
    {{- '<|turn>model
' if not turn.open -}}
    {{- '<|channel>thought
<channel|>' if not thinking -}}
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
