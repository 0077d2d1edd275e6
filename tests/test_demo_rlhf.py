"""tools/demo_rlhf.py's own parts: the rule that judges replies, the synthetic data it trains on, its chart.

The chain itself is the stages' (tests/test_sft.py, test_reward.py, test_ppo.py); here the demo's premises are
checked against the real Qwen tokenizer and the project's ChatML renderers, which are what its figures rest on.
"""

from __future__ import annotations

import importlib.util
import json
import random

import pytest

from spawn import REPO


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("demo_rlhf", REPO / "tools" / "demo_rlhf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    from megatron_qwen.tokenizer import load_tokenizer

    return load_tokenizer()


def test_the_judge_by_hand(demo):
    assert demo.judge("kind") == "kind"
    assert demo.judge(" Kind.\n") == "kind"  # case, spaces and punctuation aside
    assert demo.judge("evil") == "unkind"
    assert demo.judge("kindness") == "other"  # whole words only
    assert demo.judge("kind evil") == "other"
    assert demo.judge("") == "other"


def test_every_word_is_one_qwen_token_and_the_lists_are_disjoint(demo, tokenizer):
    # A reply is then one sampled token: PPO's decision, and MAX_NEW_TOKENS leaves room for <|im_end|> after it.
    for word in demo.KIND_WORDS + demo.UNKIND_WORDS:
        assert len(tokenizer.encode(word)) == 1, word
    assert not set(demo.KIND_WORDS) & set(demo.UNKIND_WORDS)
    assert demo.MAX_NEW_TOKENS >= 2


def test_sft_conversations_train_the_word_and_follow_the_kind_share(demo, tokenizer):
    from megatron_qwen.data.chat import render_conversation

    records = demo.sft_conversations(random.Random(0), 2000, kind_share=0.5)
    verdicts = [demo.judge(r["messages"][-1]["content"]) for r in records]
    assert set(verdicts) == {"kind", "unkind"}
    # Binomial(2000, 0.5): the share lies within 0.5 +- 0.045 with probability 1 - 6e-5.
    assert abs(verdicts.count("kind") / 2000 - 0.5) < 0.045
    rendered = render_conversation(tokenizer, records[0], max_length=demo.SEQ_LENGTH)
    ids, mask = rendered.ids, rendered.mask
    trained = [t for t, m in zip(ids, mask) if m]
    word = tokenizer.encode(records[0]["messages"][-1]["content"])[0]
    assert word in trained and trained.count(word) == 1
    assert len(ids) <= demo.SEQ_LENGTH // 2  # two conversations per packed row


def test_preference_pairs_prefer_kind_words(demo, tokenizer):
    from megatron_qwen.data.chat import render_preference

    pairs = demo.preference_pairs(random.Random(0), 1000, silent_share=0.2)
    assert all(demo.judge(p["chosen"]) == "kind" for p in pairs)
    rejected = [p["rejected"] for p in pairs]
    assert all(r == "" or demo.judge(r) == "unkind" for r in rejected)
    assert 0.15 < rejected.count("") / 1000 < 0.25
    for pair in pairs[:50]:
        chosen, other = render_preference(tokenizer, pair, max_length=demo.SEQ_LENGTH)
        assert chosen[-1] == other[-1] == tokenizer.im_end_id


def test_prompts_leave_room_for_the_reply_and_held_out_subjects_are_never_trained_on(demo, tokenizer):
    from megatron_qwen.data.chat import render_prompt

    rng = random.Random(0)
    for record in demo.prompts(rng, 200) + demo.prompts(rng, 200, demo.HELD_OUT_SUBJECTS):
        render_prompt(tokenizer, record, max_length=demo.SEQ_LENGTH - demo.MAX_NEW_TOKENS)  # raises when too long
    trained = json.dumps(demo.pretraining_texts(rng, 500) + demo.sft_conversations(rng, 500, 0.5)
                         + demo.preference_pairs(rng, 500) + demo.prompts(rng, 500))
    assert not [s for s in demo.HELD_OUT_SUBJECTS if s in trained]
    assert all(s in trained for s in demo.SUBJECTS)


def test_reply_shares_and_the_reward_chart(demo, tmp_path):
    path = tmp_path / "replies.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("kind", "nice", "evil", "")))
    assert demo.reply_shares(path) == {"kind": 0.5, "unkind": 0.25, "other": 0.25}
    lines = demo.reward_chart([-1.0, 0.0, 1.0], width=21)
    assert [line.count("#") for line in lines] == [1, 11, 21]  # the lowest mean one mark, the highest `width`
    assert lines[0].split()[:2] == ["1", "-1.000"]


@pytest.mark.parametrize("nproc", [1, 2, 4])
def test_the_dpo_ending_loads_and_keeps_whole_pairs_at_every_nproc(demo, nproc):
    """`--dpo`'s stage settings are keys of the DPO config, with the values the demo was tuned at, and its batches
    split into whole pairs (chosen and rejected side by side) at each --nproc choice."""
    from megatron_qwen.config import load_config, resolve

    config, settings = demo.DPO
    micro = 8 // nproc  # as finish_with_dpo passes it
    cfg = load_config(demo.REPO / config, demo.MODEL + settings + [f"training.micro_batch_size={micro}"], stage="dpo")
    t = cfg.training
    assert (t.lr, t.min_lr, t.weight_decay, t.train_iters, t.global_batch_size) == (1e-4, 1e-4, 0.0, 40, 16)
    assert cfg.dpo.epochs is None  # train_iters is the run's length, not the data's
    _, layout, _ = resolve(cfg, nproc)  # refuses a global batch that does not split over micro x DP
    assert layout.dp == nproc and micro % 2 == 0 and t.global_batch_size % (micro * nproc) == 0
