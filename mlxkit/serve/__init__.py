"""`mlxkit serve`: an OpenAI-compatible HTTP server for one model, with MTP speculative decoding
and prompt reuse (optional extra: `pip install 'mlxkit[serve]'`).

    protocol.py  request bodies (pydantic), the OpenAI error body, usage
    chat.py      messages -> the model's chat template -> prompt tokens (+ where to snapshot)
    parse.py     generated text -> reasoning_content, content, tool_calls (streaming)
    pool.py      decoding states of earlier prompts, by token prefix, LRU within a byte budget
    engine.py    the generation loop: continuous batching, a bounded queue, cancellation
    app.py       the Starlette routes
    cli.py       `mlxkit serve`: uvicorn on a thread, the engine on the main thread

Only cli.py is imported when the `mlxkit` command starts; the rest needs the extra.
"""

# Requests served at once by default: mlx_lm.server's --decode-concurrency. On an Apple GPU a
# decode step reads every weight whatever the batch, and these models' steps stay bound by
# memory bandwidth well past 32 sequences; the CPU this project is tested on says nothing of it.
MAX_BATCH = 32
