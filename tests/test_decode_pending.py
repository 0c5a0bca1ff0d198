"""The first draft step after plain steps (mlxkit/decode.py, `_feed_pending`): the pending
hidden states fill the MTP head's cache, and its output is computed at the last one only."""

from __future__ import annotations

import itertools

from mlxkit.draft_control import DraftControl
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
    assert heads and all(h.shape[1] == 1 and any(h is o for o in outputs) for h in heads)
    # the first round drafts after 4 plain steps: 5 pending states (the prompt's last and the
    # 4 steps'), fed as the first 4, then the last alone
    assert fed[:2] == [4, 1]
