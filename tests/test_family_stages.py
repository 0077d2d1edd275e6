"""Every stage and tool on the later Qwen families (Qwen2.5, Qwen3): vocabulary bounds, and the stages at layouts.

(a) Vocabulary: a Qwen2.5/Qwen3 model's embedding has padding rows past its tokenizer's last id (Qwen3: 151,669
tokens in 151,936 rows), and those start below v1's 151,851. `megatron-qwen generate`, `megatron-qwen forward
--generate` and PPO's rollouts draw only the family's ids, decode with its tokenizer and stop at its stop ids.
The models here make a padding row the most likely next id (the final norm keeps one hidden unit, and two
padding rows weigh it by +-30), so a bound that lets those rows through is seen at once.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

# A small model with a family's whole embedding, so text can be encoded and decoded.
WIDE_MODEL = ["model.num_layers=1", "model.hidden_size=64", "model.num_attention_heads=2", "model.ffn_hidden_size=128"]
FAMILY_ROWS = {"qwen3": 151936, "qwen2.5": 151680}  # qwen2.5: rows enough for its 151,665 tokens, fewer than v1's


def padding_rows(family: str) -> tuple[int, int]:
    """Two embedding rows past `family`'s last token and before v1's 151,851 (no tokenizer id of that family)."""
    from megatron_qwen.config import TOKENIZER_VOCAB_SIZES

    first = TOKENIZER_VOCAB_SIZES[family] + 5
    return first, first + 1


def favour_padding_rows(model, family: str) -> None:
    """Make one of `family`'s padding rows the greedy choice after any prompt: the final norm passes hidden unit 0
    alone, and the two padding rows of the output layer weigh it by +30 and -30 (one of them wins whatever its
    sign); every other row gets 0 there."""
    out = model.output_layer.weight
    with torch.no_grad():
        model.decoder.final_layernorm.weight.zero_()
        model.decoder.final_layernorm.weight[0] = 1.0
        out[:, 0] = 0.0
        a, b = padding_rows(family)
        out[a, 0], out[b, 0] = 30.0, -30.0


@pytest.fixture(scope="module")
def wide_checkpoints(single_rank, tmp_path_factory):
    """{family: checkpoint} of WIDE_MODEL with FAMILY_ROWS rows, a padding row favoured (`favour_padding_rows`)."""
    import yaml

    from megatron_qwen.checkpoint.io import save_model
    from megatron_qwen.config import load_config
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime

    out = {}
    for family, rows in FAMILY_ROWS.items():
        path = tmp_path_factory.mktemp(family) / "ckpt"
        cfg = load_config("configs/tiny.yaml", WIDE_MODEL + [f"model.family={family}",
                                                              f"model.padded_vocab_size={rows}"])
        (model,) = build_model(cfg, Runtime.cpu())
        favour_padding_rows(model, family)
        save_model([model], path)
        (path / "model_config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
        out[family] = path
    return out


@pytest.fixture
def cli_in_process(single_rank):
    """The CLIs' `main` tears megatron-core's groups down on exit: set them up again for the next tests."""
    from megatron_qwen.platform.launch import init_distributed

    yield
    init_distributed(1, 1, None, device="cpu")


@pytest.mark.parametrize("family", sorted(FAMILY_ROWS))
def test_generate_cli_samples_decodes_and_stops_with_the_family_tokenizer(wide_checkpoints, family, tmp_path,
                                                                          cli_in_process):
    from megatron_qwen.cli import generate
    from megatron_qwen.config import TOKENIZER_VOCAB_SIZES
    from megatron_qwen.tokenizer import load_tokenizer

    tok = load_tokenizer(family=family)
    out = tmp_path / "out.jsonl"
    assert generate.main(["--ckpt", str(wide_checkpoints[family]), "--chat", "--prompt", "Hello there",
                          "--max-new-tokens", "4", "--temperature", "0", "--out", str(out)]) == 0
    (line,) = [json.loads(text) for text in out.read_text().splitlines()]
    # The family's template: Qwen3 has no default system prompt, Qwen2.5 its own.
    assert tok.decode(line["prompt_tokens"]) == tok.render_chat_text(
        [{"role": "user", "content": "Hello there"}], add_generation_prompt=True)
    assert all(t < TOKENIZER_VOCAB_SIZES[family] for t in line["tokens"]), line["tokens"]
    assert line["text"] == tok.decode([t for t in line["tokens"] if t not in tok.stop_ids])


def test_generate_cli_stops_at_the_family_stop_ids(wide_checkpoints, tmp_path, cli_in_process):
    """With the padding rows out of reach, <|im_end|> is made the greedy choice: the reply ends there."""
    import yaml

    from megatron_qwen.checkpoint.io import load_model, save_model
    from megatron_qwen.cli import generate
    from megatron_qwen.config import load_config
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.tokenizer import load_tokenizer

    tok = load_tokenizer(family="qwen3")
    cfg = load_config("configs/tiny.yaml", WIDE_MODEL + ["model.family=qwen3", "model.padded_vocab_size=151936"])
    (model,) = build_model(cfg, Runtime.cpu())
    load_model([model], wide_checkpoints["qwen3"])
    with torch.no_grad():  # <|im_end|> and <|endoftext|> take the padding rows' weights
        out = model.output_layer.weight
        out[tok.im_end_id, 0], out[tok.eod_id, 0] = out[padding_rows("qwen3")[0], 0], out[padding_rows("qwen3")[1], 0]
    ckpt = tmp_path / "ckpt"
    save_model([model], ckpt)
    (ckpt / "model_config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    result = tmp_path / "out.jsonl"
    assert generate.main(["--ckpt", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "4", "--temperature", "0",
                          "--out", str(result)]) == 0
    line = json.loads(result.read_text())
    assert line["finished"] and len(line["tokens"]) == 1 and line["tokens"][0] in (tok.im_end_id, tok.eod_id), line
    assert line["text"] == ""


def test_forward_cli_greedy_tokens_are_the_family_ids_and_decode(wide_checkpoints, tmp_path, capsys,
                                                                 cli_in_process):
    from megatron_qwen.cli import forward
    from megatron_qwen.config import TOKENIZER_VOCAB_SIZES
    from megatron_qwen.tokenizer import load_tokenizer

    tok = load_tokenizer(family="qwen3")
    prompt = tok.encode("Hello there")
    np.save(tmp_path / "tokens.npy", np.array([prompt]))
    assert forward.main(["--ckpt", str(wide_checkpoints["qwen3"]), "--tokens", str(tmp_path / "tokens.npy"),
                         "--out", str(tmp_path / "logits.npy"), "--generate", "3"]) == 0
    rows = np.load(tmp_path / "logits.generated.npy")
    new = rows[0, len(prompt):].tolist()
    assert len(new) == 3 and all(t < TOKENIZER_VOCAB_SIZES["qwen3"] for t in new), new
    printed = capsys.readouterr().out
    assert f"row 0: {tok.decode(prompt)!r} -> {tok.decode(new)!r}" in printed, printed


@pytest.mark.parametrize("family", sorted(FAMILY_ROWS))
def test_ppo_rollouts_draw_the_family_ids_and_rewards_read_its_text(wide_checkpoints, family, single_rank):
    from megatron_qwen.checkpoint.io import load_model
    from megatron_qwen.config import TOKENIZER_VOCAB_SIZES, load_config
    from megatron_qwen.inference.sampling import SamplingParams
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.rl.trainer import PPORun
    from megatron_qwen.tokenizer import load_tokenizer

    cfg = load_config("configs/tiny.yaml", WIDE_MODEL + [
        f"model.family={family}", f"model.padded_vocab_size={FAMILY_ROWS[family]}",
        "ppo.reward_fn=ppo_rewards:good_fraction", "ppo.policy_from=unused"])
    chunks = build_model(cfg, Runtime.cpu(), rope_at_positions=True)
    load_model(chunks, wide_checkpoints[family])
    tok = load_tokenizer(family=family)
    trainer = SimpleNamespace(
        cfg=cfg, ctx=SimpleNamespace(runtime=Runtime.cpu(), layout=SimpleNamespace(dp=1), dp_rank=0),
        units={"policy": SimpleNamespace(chunks=chunks)}, frozen={}, state=SimpleNamespace(stage_state={}, step=0),
        tokenizer=tok)
    run = PPORun(trainer)
    result = run.engine.generate([tok.encode("Hello there")],
                                 SamplingParams(max_new_tokens=3, temperature=0.0, stop_ids=run.stop_ids))
    assert all(t < TOKENIZER_VOCAB_SIZES[family] for t in result.tokens[0]), result.tokens
    assert run.stop_ids == (tok.im_end_id, tok.im_start_id, tok.eod_id)
    assert run.score.decode == tok.decode  # the reward function reads the rollouts' text
