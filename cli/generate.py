"""`gemma4 generate`: one answer to one prompt, streamed to stdout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import distributed as parallel
from . import options

JsonSchema = Annotated[
    str | None,
    typer.Option(
        "--json-schema",
        metavar="FILE_OR_JSON",
        help="Answer in compact JSON valid for this JSON Schema: a .json file or inline JSON "
        "(true: any JSON object).",
    ),
]
ToolChoice = Annotated[
    str,
    typer.Option(
        "--tool-choice",
        help="With --tools: auto (the model decides), none (no call), required (one call) or "
        "a function name (one call to it).",
    ),
]


def read_json_schema(value: str) -> str | bool:
    """The schema: VALUE itself when it is inline JSON, else the text of the file it names
    (True for `true`, any JSON object); checked, with one line on a missing file, invalid
    JSON or a schema the engine cannot enforce."""
    from mlx_gemma4.constrain import check_json_schema
    from mlx_gemma4.errors import ConstraintError
    from mlx_gemma4.files import access_error

    inline = value.lstrip().startswith("{") or value.strip() == "true"
    if inline:
        text, source = value, "--json-schema"
    else:
        try:
            text = Path(value).read_text()
        except OSError as error:
            raise access_error(value, "read the JSON schema", error) from None
        except UnicodeDecodeError:
            raise ConstraintError(f"JSON schema file {value}: not a text file") from None
        source = f"JSON schema file {value}"
    schema = True if text.strip() == "true" else text
    try:
        check_json_schema(schema)
    except ConstraintError as error:
        raise ConstraintError(f"{source}: {error}") from None
    return schema


@options.with_generation_flags(max_tokens=512)
@parallel.reports_lost_ranks
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt; - reads stdin.")],
    flags: options.GenerationFlags,
    model: options.Model = options.DEFAULT_MODEL,
    system: options.System = None,
    raw: Annotated[
        bool, typer.Option("--raw", metavar="", help="Send the prompt as is, no chat template.")
    ] = False,
    tools: options.Tools = None,
    tool_choice: ToolChoice = "auto",
    json_schema: JsonSchema = None,
    adapter: options.Adapter = None,
    distributed: parallel.Distributed = None,
    distributed_timeout: parallel.DistributedTimeout = parallel.DEFAULT_TIMEOUT,
) -> None:
    """Stream one answer to PROMPT (wrapped as a user turn unless --raw). With --tools, the
    calls the model makes follow the answer on stdout, one JSON line each
    ({"name": ..., "arguments": {...}}); they are not run. With --json-schema, the answer is
    JSON valid for the schema. Under mlx.launch, --distributed splits the model across the
    ranks; rank 0 prints the answer."""
    from mlx_gemma4 import PromptCache, load, stream_generate
    from mlx_gemma4.constrain import check_tool_choice
    from mlx_gemma4.tools import load_tools

    # bad input before loading
    tool_list = load_tools(tools) if tools is not None else None
    schema = read_json_schema(json_schema) if json_schema is not None else None
    check_tool_choice(tool_list, tool_choice, schema)
    group = parallel.start(distributed)
    text = parallel.prompt_text(prompt, group)
    loaded_model, processor = load(
        model,
        dtype=flags.dtype,
        adapter_path=adapter,
        **parallel.load_options(group, distributed),
    )
    draft = flags.draft_settings(loaded_model)
    if raw:
        request = text
    else:
        request = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text}
        ]
    responses = stream_generate(
        loaded_model,
        processor,
        request,
        enable_thinking=flags.think,
        tools=tool_list,
        tool_choice=tool_choice,
        json_schema=schema,
        sampling=flags.sampling,
        prompt_cache=PromptCache(loaded_model, flags.kv_quantization),
        **draft,
    )
    options.print_answer(parallel.watched(responses, group, distributed_timeout), flags.stats)
