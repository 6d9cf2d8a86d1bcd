"""`gemma4 serve`: the OpenAI-compatible server (the logic lives in mlx_gemma4.server)."""

from __future__ import annotations

import gc
import ipaddress
import socket
from typing import Annotated

import typer

from mlx_gemma4.errors import Gemma4Error

from . import distributed as parallel
from . import options


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port(host: str, port: int) -> None:
    """Fail in one line before the model loads when the address cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise Gemma4Error(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


@parallel.reports_lost_ranks
def serve(
    model: options.Model = options.DEFAULT_MODEL,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (loopback unless told).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=1, max=65535)] = 8080,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="GEMMA4_API_KEY",
            help="Require 'Authorization: Bearer KEY' on /v1/ requests.",
        ),
    ] = None,
    max_concurrency: Annotated[
        int | None,
        typer.Option("--max-concurrency", min=1, help="Requests decoded at once (rest wait)."),
    ] = None,
    kv_budget: Annotated[
        int | None,
        typer.Option("--kv-budget", min=1, help="Bytes of KV cache the running requests may use."),
    ] = None,
    kv_bits: options.KVBits = None,
    prefix_cache_bytes: Annotated[
        int,
        typer.Option(
            "--prefix-cache-bytes", min=0, help="Bytes of prompt caches kept for reuse (0: off)."
        ),
    ] = 1024**3,
    allow_local_paths: Annotated[
        bool | None,
        typer.Option(
            "--allow-local-paths/--no-allow-local-paths",
            metavar="",
            help="Let requests name image, audio and video files on this machine "
            "(default: only on a loopback address).",
        ),
    ] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="A request's limit when it sets none.")
    ] = 2048,
    dtype: options.Dtype = None,
    adapter: options.Adapter = None,
    draft_model: options.DraftModel = None,
    draft_tokens: options.DraftTokens = 4,
    log_level: Annotated[
        str, typer.Option("--log-level", help="debug, info, warning or error.")
    ] = "info",
    distributed: parallel.Distributed = None,
    distributed_timeout: parallel.DistributedTimeout = parallel.DEFAULT_TIMEOUT,
) -> None:
    """Serve the model over OpenAI's API (chat, completions, transcriptions) and a chat page.
    Under mlx.launch, --distributed splits the model across the ranks: rank 0 serves, the
    others follow its engine."""
    from mlx_gemma4.kv_quant import KVQuantization

    KVQuantization.from_bits(kv_bits, None, None)  # bad bits fail before the model loads
    if log_level.lower() not in ("debug", "info", "warning", "error"):
        raise Gemma4Error(f"--log-level: {log_level!r} is not debug, info, warning or error")
    if distributed is not None and draft_model is not None:
        raise Gemma4Error(
            "--draft-model: drafting is not supported with --distributed yet; drop one of them"
        )
    group = parallel.start(distributed)
    leader = group is None or group.rank() == 0
    if leader:
        _check_port(host, port)
    try:
        from mlx_gemma4.server import MediaPolicy, ServerSettings, create_app, follow
        from mlx_gemma4.server import serve as run
    except ImportError as e:
        raise Gemma4Error(
            f"gemma4 serve needs {e.name or 'fastapi'}: pip install 'mlx-gemma4[serve]'"
        ) from None
    from mlx_gemma4 import load

    loopback = _is_loopback(host)
    local = loopback if allow_local_paths is None else allow_local_paths
    if not loopback and api_key is None:
        typer.echo(
            f"warning: listening on {host} without --api-key: anyone who can reach this "
            "address can use the model",
            err=True,
        )
    settings = ServerSettings(
        model_name=model,
        api_key=api_key,
        max_concurrency=max_concurrency,
        kv_budget_bytes=kv_budget,
        kv_bits=kv_bits,
        prefix_cache_bytes=prefix_cache_bytes,
        default_max_tokens=max_tokens,
        media=MediaPolicy(allow_local_paths=local),
        draft_tokens=draft_tokens,
        distributed_timeout=distributed_timeout,
    )
    loaded, processor = load(
        model, dtype=dtype, adapter_path=adapter, **parallel.load_options(group, distributed)
    )
    drafter = None
    if draft_model is not None:
        from mlx_gemma4.drafters import load_draft_model

        drafter = load_draft_model(draft_model, loaded, dtype=dtype)
    try:
        if not leader:
            follow(loaded, processor, settings, group)
            return
        typer.echo(f"serving {model} on http://{host}:{port}/ (Ctrl-C stops)", err=True)
        app = create_app(loaded, processor, settings, draft_model=drafter, group=group)
        run(app, host, port, log_level=log_level.lower())
    finally:
        # The interpreter's last collection walks every object the model, tokenizer and web
        # stack made (hundreds of thousands) and takes seconds; the process is ending anyway.
        gc.freeze()
