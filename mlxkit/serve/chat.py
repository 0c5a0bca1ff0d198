"""From an OpenAI chat request to prompt tokens, through the model's own chat template.

Besides the tokens, rendering decides what the server needs to reuse work across turns:
- whether the prompt leaves a `<think>` block open (Qwen 3.5 with thinking on), so the output
  starts as reasoning;
- where to keep a snapshot of the state (`snapshot_at`): where the next turn of this
  conversation will stop agreeing with this prompt, and at most all but the prompt's last
  token. Qwen's templates render an earlier assistant turn without the generation prompt's
  `<think>` opening (and without its reasoning), so the state after this prompt and its answer
  is not a prefix of the next turn's prompt; and even where the template keeps the prompt
  whole (ChatML without a think block), an answer that does not tokenize back to the ids
  generated (or that the client edits) parts from them. The state at the point where they part
  is a prefix of the next turn; the same point, or all but the last token, serves the same
  prompt sent again (a state is reused only for a strict prefix: the last token's logits are
  needed). Found by rendering the conversation followed by a placeholder assistant answer and
  a user message, and comparing tokens;
- once answered, what the next turn's prompt will start with: the conversation, the answer as
  the template will render it back, and the next message's opening (two renderings with
  different placeholder messages agree up to there). The server prefills that while idle.

An `image_url` part is rendered as the chat template writes an image (vision_start, pad,
vision_end) and each pad then expanded to the image's vision tokens (`mlxkit.vision`), so a
prompt with images is the same token list the Python API makes for it.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field

import jinja2

from mlxkit.multimodal import PART_TEXT
from mlxkit.serve.protocol import ChatRequest, ImagePart, Message, RequestError
from mlxkit.vision import VisionInput, VisionInputError, expand_prompt

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_PLACEHOLDER = "x"  # any text: it only has to differ from the generation prompt's first token


@dataclass
class Prompt:
    tokens: list[int]
    reasoning: bool = False  # the output starts inside a <think> block
    snapshot_at: int | None = None  # keep the state after this many tokens (see the docstring)
    images: list[VisionInput] = field(default_factory=list)  # whose pads `tokens` hold, in order


@dataclass(frozen=True)
class TextBound:
    """Refuses, before it is tokenized, text that cannot fit the context: no token stands for
    more than `longest` bytes of (NFC-normalized, as the tokenizer reads it) text, so text of
    more bytes than context × longest is more tokens than the context holds. Tokenizing
    megabytes costs seconds to minutes of CPU; this check costs milliseconds."""

    context: int
    longest: int  # bytes of the vocabulary's longest token

    @classmethod
    def of(cls, tokenizer, context: int) -> TextBound:
        longest = max(len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size))
        return cls(context, max(longest, 1))

    def check(self, text: str, param: str) -> None:
        n = len(unicodedata.normalize("NFC", text).encode("utf-8"))
        if n > self.context * self.longest:
            raise RequestError(
                f"the prompt is longer than the model's context of {self.context} tokens "
                f"({n} bytes of text: at least {-(-n // self.longest)} tokens)",
                param=param,
            )


def template_messages(messages: list[Message]) -> list[dict]:
    """Messages as chat templates read them: text parts joined into one string, absent content
    as "", tool-call arguments as the objects their JSON text holds."""
    out = []
    for i, m in enumerate(messages):
        item: dict = {"role": m.role, "content": _text(m)}
        if m.name is not None:
            item["name"] = m.name
        if m.reasoning_content is not None:
            item["reasoning_content"] = m.reasoning_content
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            item["tool_calls"] = [
                _tool_call(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(m.tool_calls)
            ]
        out.append(item)
    return out


def _text(message: Message) -> str:
    content = message.content
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(PART_TEXT["image"] if isinstance(p, ImagePart) else p.text for p in content)


def image_parts(messages: list[Message]) -> list[tuple[str, str]]:
    """(url, param name) of every image_url part, in prompt order."""
    return [
        (part.image_url.url, f"messages[{i}].content[{j}]")
        for i, m in enumerate(messages)
        if isinstance(m.content, list)
        for j, part in enumerate(m.content)
        if isinstance(part, ImagePart)
    ]


def _tool_call(call, param: str) -> dict:
    try:
        arguments = json.loads(call.function.arguments or "{}")
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise RequestError(
            "function.arguments must be a JSON object (as text)",
            param=f"{param}.function.arguments",
        )
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.function.name, "arguments": arguments},
    }


def _renderer(tokenizer, request: ChatRequest):
    def render(msgs: list[dict], generation_prompt: bool, with_tools: list | None) -> str:
        try:
            return tokenizer.apply_chat_template(
                msgs,
                generation_prompt,
                request.enable_thinking,
                tools=with_tools,
                **request.template_kwargs,
            )
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            raise RequestError(f"the chat template cannot render these messages: {e}") from None

    return render


def _encoder(tokenizer, images: list[VisionInput] | None):
    """Rendered text → token ids; with `images` (a vision model's request), each image pad
    expanded to its image's vision tokens first."""

    def encode(text: str) -> list[int]:
        if images is not None:
            try:
                text = expand_prompt(text, images)
            except VisionInputError as e:
                raise RequestError(str(e), param="messages") from None
        return tokenizer.encode(text)

    return encode


def render_chat(
    tokenizer,
    request: ChatRequest,
    images: list[VisionInput] | None = None,
    bound: TextBound | None = None,
) -> Prompt:
    """`images`: the request's image parts, prepared (`mlxkit.serve.images.request_images`),
    for a model that reads them; None for a text-only model. `bound`: refuses a rendered
    prompt too long for the context before it is tokenized."""
    messages = template_messages(request.messages)
    tools = request.tool_specs
    render, encode = _renderer(tokenizer, request), _encoder(tokenizer, images)
    text = render(messages, True, tools)
    if tools and text == render(messages, True, None):
        raise RequestError("this model's chat template does not render tools", param="tools")
    if bound is not None:
        bound.check(text, "messages")
    tokens = encode(text)
    probe = [
        *messages,
        {"role": "assistant", "content": _PLACEHOLDER},
        {"role": "user", "content": _PLACEHOLDER},
    ]
    try:
        next_turn = encode(render(probe, False, tools))
    except RequestError:  # a template with rules the placeholder breaks: no snapshot
        next_turn = []
    n = common_prefix(tokens, next_turn)
    return Prompt(
        tokens,
        reasoning=text.rfind(THINK_OPEN) > text.rfind(THINK_CLOSE),
        snapshot_at=n if 0 < n < len(tokens) else len(tokens) - 1,
        images=list(images or []),
    )


def next_turn_prefix(
    tokenizer, request: ChatRequest, reply: dict, images: list[VisionInput] | None = None
) -> list[int] | None:
    """The tokens the next request of this conversation will start with, `reply` being the
    answer just given (as the client will send it back): followed by a tool result when it
    called tools, else by a user message. The last token the two renderings share is left out:
    BPE may merge it with the start of the real message (a newline with a leading newline).
    `images` as for `render_chat`. None if the template will not render it."""
    render, encode = _renderer(tokenizer, request), _encoder(tokenizer, images)
    messages = [*template_messages(request.messages), reply]
    role = "tool" if reply.get("tool_calls") else "user"
    try:
        a, b = (
            encode(render([*messages, {"role": role, "content": text}], False, request.tool_specs))
            for text in ("a", "b")
        )
    except RequestError:
        return None
    n = common_prefix(a, b) - 1
    return a[:n] if n > 0 else None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
