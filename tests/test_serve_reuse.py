"""Prompt reuse on a plain chat template (ChatML without a think block), where the state after
a prompt and its answer is a prefix of the next turn only when the answer tokenizes back to
the ids generated. The server keeps the state of every prompt but its last token, so the same
prompt sent again, a next turn whatever its answer, and an image chat's next request all start
from it (`cached_tokens`)."""

from __future__ import annotations

import pytest

from tests.helpers import FIXTURES
from tests.serve_helpers import (  # noqa: F401 - time_limit: autouse, bounds every test here
    Server,
    micro_with_template,
    time_limit,
)
from tests.test_serve_vision import asking, data_url

CHATML = """{%- for message in messages -%}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% endif -%}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The tiny vision fixture (it reads text and images) with a ChatML template."""
    tmp = tmp_path_factory.mktemp("chatml")
    (tmp / "chatml.jinja").write_text(CHATML)
    s = Server(
        "--model",
        str(micro_with_template(tmp, tmp / "chatml.jinja", FIXTURES / "tiny_vision_p4")),
        "--max-tokens",
        "16",
    )
    yield s
    assert s.stop() == 0, "".join(s.log)


def chat(server: Server, messages: list[dict]):
    r = server.client().chat.completions.create(
        model="m", messages=messages, max_tokens=6, temperature=0
    )
    server.wait_idle()  # the next-turn work done, so that each request sees a settled pool
    return r


def test_the_same_chat_three_times_reuses_all_but_its_last_token(server):
    messages = [{"role": "user", "content": "def tokenize(source):\n    "}]
    usages = [chat(server, messages).usage for _ in range(3)]
    n = usages[0].prompt_tokens
    assert [u.prompt_tokens_details.cached_tokens for u in usages] == [0, n - 1, n - 1]


def test_a_next_turn_reuses_the_first_whatever_the_answer(server):
    """The answer sent back is not what the model wrote (an edited answer, or one that does not
    tokenize back to the ids generated): the first turn's prompt is still reused."""
    first = [{"role": "user", "content": "class Queue:\n    "}]
    n = chat(server, first).usage.prompt_tokens
    second = [
        *first,
        {"role": "assistant", "content": "An answer the model never wrote."},
        {"role": "user", "content": "And then?"},
    ]
    r = chat(server, second)
    assert r.usage.prompt_tokens > n
    assert r.usage.prompt_tokens_details.cached_tokens == n - 1


def test_the_same_completion_prompt_reuses_all_but_its_last_token(server):
    client = server.client()
    cached = []
    for _ in range(2):
        r = client.completions.create(model="m", prompt="import os\nimport sys\n", max_tokens=4)
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
    assert cached == [0, r.usage.prompt_tokens - 1]


def test_an_image_chat_sent_again_does_not_encode_its_image_again(server):
    messages = [asking(data_url(FIXTURES / "tiny_vision_p4" / "image0.png"))]
    usages = [chat(server, messages).usage for _ in range(2)]
    n = usages[0].prompt_tokens
    assert [u.prompt_tokens_details.cached_tokens for u in usages] == [0, n - 1]
