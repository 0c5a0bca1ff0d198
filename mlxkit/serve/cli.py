"""`mlxkit serve`. Kept free of heavy imports: it is loaded whenever the `mlxkit` command starts;
the server stack and the model are imported only when the command runs."""

from __future__ import annotations

import importlib.util
import signal
import threading
import time
from pathlib import Path

import click

from mlxkit.cli_options import NumDraft, kv_cache_options
from mlxkit.errors import MlxkitError
from mlxkit.serve import MAX_BATCH

SERVER_STACK = ("starlette", "uvicorn", "pydantic")
SHUTDOWN_GRACE_S = 3  # how long responses in progress get to finish once the server stops


def require_server_stack() -> None:
    missing = [m for m in SERVER_STACK if importlib.util.find_spec(m) is None]
    if missing:
        raise MlxkitError(f"mlxkit serve needs {', '.join(missing)}: pip install 'mlxkit[serve]'")


@click.command("serve")
@click.option("--model", "model_path", help="Model directory (HF or MLX layout) or bundle.")
@click.option("--size", help='A published size (0.8b, 2b, 4b, 9b: Hugging Face cache) or "micro".')
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=8080,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port (0: any free one; the one taken is printed).",
)
@click.option("--api-key", help="Require 'Authorization: Bearer KEY' on /v1 endpoints.")
@click.option(
    "--max-batch",
    default=MAX_BATCH,
    show_default=True,
    type=click.IntRange(1),
    help="Requests served at once, decoded together in one batch (mlx_lm.server's "
    "--decode-concurrency default).",
)
@click.option(
    "--max-queue",
    default=8,
    show_default=True,
    type=click.IntRange(0),
    help="Requests waiting for a place in the batch; more get 503.",
)
@click.option(
    "--prompt-cache-size",
    default="1GiB",
    show_default=True,
    help="Bytes of decoding states kept for prompt reuse (e.g. 512MB; 0: off).",
)
@click.option(
    "--max-tokens",
    default=8192,
    show_default=True,
    type=click.IntRange(1),
    help="The most tokens a request may generate (and its default).",
)
@click.option("--mtp/--no-mtp", default=True, show_default=True, help="MTP speculative decoding.")
@click.option(
    "--num-draft",
    default="auto",
    show_default=True,
    type=NumDraft(),
    help="Tokens drafted per MTP round: auto (0-3 per round, whatever is fastest) or N.",
)
@kv_cache_options(
    "Keep every request's KV cache quantized at 4 or 8 bits [not quantized: the model's "
    "dtype]; the prompt cache holds states of this one setting."
)
@click.option(
    "--allowed-local-media-path",
    "media_dirs",
    multiple=True,
    metavar="DIR",
    help="A directory whose image files image_url parts may name (file:///...; "
    "repeatable). Without it only data URLs are read.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def serve(
    model_path: str | None,
    size: str | None,
    host: str,
    port: int,
    api_key: str | None,
    max_batch: int,
    max_queue: int,
    prompt_cache_size: str,
    max_tokens: int,
    mtp: bool,
    num_draft: int | str,
    kv_bits: int | None,
    kv_group_size: int,
    quantized_kv_start: int,
    media_dirs: tuple[str, ...],
    log_level: str,
) -> None:
    """An OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models,
    /v1/stats, /health) for one model, with MTP and prompt reuse."""
    require_server_stack()
    from mlxkit.cache import kv_quantization
    from mlxkit.decode import MAX_DRAFT
    from mlxkit.ios_bridge.devices import parse_bytes

    if num_draft != "auto" and not 1 <= num_draft <= MAX_DRAFT:
        raise click.BadParameter(
            f"{num_draft} is not auto or between 1 and {MAX_DRAFT}", param_hint="'--num-draft'"
        )

    if (model_path is None) == (size is None):
        raise MlxkitError("pass either --model PATH or --size SIZE")
    kv_quantization(kv_bits, kv_group_size, quantized_kv_start)  # refused before loading
    cache_bytes = 0 if prompt_cache_size.strip() == "0" else parse_bytes(prompt_cache_size)
    allowed = tuple(media_dir(d) for d in media_dirs)
    model_path, name = model_source(model_path, size)

    from mlxkit.load import load
    from mlxkit.serve.app import Settings, create_app
    from mlxkit.serve.engine import Engine

    model, tokenizer = load(model_path)
    if mtp and not model.has_mtp:
        click.echo("warning: this model has no MTP weights; decoding without speculation", err=True)
    engine = Engine(
        model,
        tokenizer,
        max_batch=max_batch,
        max_queue=max_queue,
        prompt_cache_bytes=cache_bytes,
        mtp=mtp,
        num_draft=num_draft,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        quantized_kv_start=quantized_kv_start,
    )
    app = create_app(engine, Settings(name, max_tokens, api_key, media_dirs=allowed))
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(
            f"warning: listening on {host} without --api-key: anyone who can reach it "
            "can use the model",
            err=True,
        )
    mtp_note = f"on, {num_draft} drafts" if engine.mtp else "off"
    kv_note = "" if engine.kv is None else f"; KV cache {engine.kv.bits}-bit"
    settings = (
        f"MTP {mtp_note}{kv_note}; prompt cache {cache_bytes / 2**20:.0f} MiB; "
        f"batch {max_batch}, queue {max_queue}"
    )
    run(
        engine,
        app,
        host,
        port,
        log_level,
        banner=lambda p: f"mlxkit serve: {name} at http://{host}:{p}/v1 ({settings})",
    )


def model_source(model_path: str | None, size: str | None) -> tuple[str, str]:
    """(the directory to load, the model's name in /v1/models) from --model or --size."""
    if size is not None:
        from mlxkit.source import resolve_size

        source = resolve_size(size, "pass --model DIR")
        return str(source.directory), source.name
    from mlxkit.load import resolve_model_dir

    name = resolve_model_dir(model_path).name
    if name == "model":  # an iPhone bundle's model/
        name = Path(model_path).expanduser().resolve().name
    return model_path, name


def media_dir(value: str) -> Path:
    """An --allowed-local-media-path, resolved (links and `..`), as image paths are judged."""
    from mlxkit.fields import local_path

    path = local_path(value, "--allowed-local-media-path")
    if not path.is_dir():
        raise MlxkitError(f"--allowed-local-media-path {path}: not a directory")
    return path.resolve()


def run(engine, app, host: str, port: int, log_level: str, banner) -> None:
    """The HTTP server on a thread of its own, the engine on this (the main) thread, until
    Ctrl-C or SIGTERM.

    Both signals only set `stopping`, which the engine reads between jobs and between tokens:
    the generation in progress and the requests still waiting are answered with a 503 (a
    stream with its error event and [DONE]) while the HTTP server finishes their responses.
    The handlers are installed here, whatever the process inherited: where SIGINT was ignored
    at start (a process started in the background by a non-interactive shell, as test runners
    and service managers do) Python installs no KeyboardInterrupt handler, so Ctrl-C and
    `_thread.interrupt_main` did nothing and the server never stopped. A second signal raises
    KeyboardInterrupt: a way out should shutting down hang. The previous handlers come back
    on return."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="off",
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="mlxkit-serve-http", daemon=True)
    stopping = threading.Event()

    def on_signal(signum, frame):
        if stopping.is_set():
            raise KeyboardInterrupt
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        thread.start()
        while not server.started:
            if not thread.is_alive():
                raise MlxkitError(f"cannot listen on {host}:{port} (see the error above)")
            time.sleep(0.02)
        bound = server.servers[0].sockets[0].getsockname()[1]
        click.echo(banner(bound), err=True)
        engine.run(stop=lambda: stopping.is_set() or server.should_exit or not thread.is_alive())
    except KeyboardInterrupt:
        pass
    finally:
        engine.close()
        server.should_exit = True
        thread.join(timeout=SHUTDOWN_GRACE_S + 2)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
