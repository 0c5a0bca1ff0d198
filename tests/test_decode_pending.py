"""The first draft step after plain steps (mlxkit/decode.py, `_feed_pending`): the pending
hidden states fill the MTP head's cache, and its output is computed at the last one only."""

from __future__ import annotations

import itertools

import mlx.core as mx

from mlxkit.decode import _feed_pending
from mlxkit.draft_control import K_MAX, DraftControl
from mlxkit.models.qwen3_5 import Rotary
from tests.test_generate import PROMPTS, assert_mtp_cache_is_a_pass_over, fixture_model, run


def test_a_draft_after_plain_steps_runs_the_mtp_output_at_one_position(monkeypatch):
    """Only the last pending position's MTP output is used, so the draft logits come from a
    pass over that position alone and the positions before it go through a pass of their own,
    whose output nothing evaluates (only their KV entries are computed). A pass over all of
    them at once computed the whole MTP layer at every pending position: with quantized
    weights on a CPU, a probe after 64 plain steps cost 8.4 decode steps instead of 3.4."""
    model, tokenizer = fixture_model("mixed")
    outputs, passes, heads = [], [], []
    mtp_hidden, draft_logits = model.mtp_hidden, model.draft_logits

    def spy_hidden(hidden, next_tokens, cache=None, rotary=None):
        out = mtp_hidden(hidden, next_tokens, cache, rotary)
        outputs.append(out)
        passes.append(hidden.shape[1])
        return out

    def spy_logits(h):
        heads.append(h)
        return draft_logits(h)

    monkeypatch.setattr(model, "mtp_hidden", spy_hidden)
    monkeypatch.setattr(model, "draft_logits", spy_logits)
    script, choose = itertools.cycle([0, 0, 0, 0, 1, 0, 2]), DraftControl.choose
    monkeypatch.setattr(DraftControl, "choose", lambda self: choose(self) * 0 + next(script))
    plain, _ = run(model, tokenizer, PROMPTS[0], max_tokens=30, mtp=False)
    passes.clear()
    auto, cache = run(model, tokenizer, PROMPTS[0], max_tokens=30)
    fed = passes[1:]  # the first is the prompt's
    assert [r.token for r in auto] == [r.token for r in plain]
    assert_mtp_cache_is_a_pass_over(model, cache)
    assert heads and all(h.shape[1] == 1 for h in heads)
    assert heads[0] is outputs[2]  # after plain steps: the last position's pass alone
    # the first round drafts after 4 plain steps: 5 pending states (the prompt's last and the
    # 4 steps'), fed as the first 4, then the last alone
    assert fed[:2] == [4, 1]


def test_the_few_states_a_round_leaves_go_through_in_one_pass(monkeypatch):
    """After an MTP round at most K_MAX + 1 states are pending: one pass over them all (a
    second, tiny pass costs more than it saves where rows are nearly free, bf16); more than
    that (after plain steps) are fed as above."""
    model, tokenizer = fixture_model("mixed")
    _, cache = run(model, tokenizer, PROMPTS[0], max_tokens=12)
    passes = []
    mtp_hidden = model.mtp_hidden

    def spy(hidden, next_tokens, cache=None, rotary=None):
        passes.append(hidden.shape[1])
        return mtp_hidden(hidden, next_tokens, cache, rotary)

    monkeypatch.setattr(model, "mtp_hidden", spy)
    hidden = mx.random.normal((1, K_MAX + 2, model.config.hidden_size))
    for n, expected in [(K_MAX + 1, [K_MAX + 1]), (2, [2]), (K_MAX + 2, [K_MAX + 1, 1])]:
        passes.clear()
        cache.mtp_pending = hidden[:, :n]
        h = _feed_pending(model, cache, 7, Rotary.text(cache.rope_delta))
        assert passes == expected and h.shape == (1, 1, model.config.hidden_size)
