"""Context parallelism (`parallel.cp`) on the local spec: megatron-core's load-balanced split, the attention over
keys gathered from every CP rank, and whole models at CP=2 (alone, with TP and sequence parallelism, with PP)
against CP=1 on gloo CPU ranks: logits, ten training steps, packed SFT rows, resuming at another CP, the reward and
DPO stages, PPO and GRPO, `megatron-qwen forward --cp`. Transformer Engine's context parallelism (which needs TE
and two GPUs: tools/gpu_checks.py) is checked here for what megatron-core receives: its config fields, the THD
layout of packed rows and the comm-type rules."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
import torch.nn.functional as F

from spawn import run_torchrun

HEADS, GROUPS, HEAD_DIM = 4, 2, 8


def test_split_matches_megatron_core_chunk_order():
    """Rank r of cp holds chunks r and 2cp-1-r of 2cp (megatron.core.utils.get_batch_on_this_cp_rank), written out
    by hand for cp=2 and cp=3; the global positions name the same tokens."""
    from megatron_qwen.model.context_parallel import split_batch, split_sequence, token_positions

    seq = torch.arange(12)[None]  # one row of 12 tokens, value = position
    assert split_sequence(seq, 1, 0, 2).tolist() == [[0, 1, 2, 9, 10, 11]]
    assert split_sequence(seq, 1, 1, 2).tolist() == [[3, 4, 5, 6, 7, 8]]
    assert [split_sequence(seq, 1, r, 3).tolist()[0] for r in range(3)] == [[0, 1, 10, 11], [2, 3, 8, 9], [4, 5, 6, 7]]
    for size in (2, 3):
        for rank in range(size):
            assert token_positions(12 // size, rank, size).tolist() == split_sequence(seq, 1, rank, size)[0].tolist()
    batch = {"tokens": seq, "labels": seq + 1, "reference_logprobs": torch.tensor([0.5])}
    mine = split_batch(batch, rank=1, size=2)
    assert mine["labels"].tolist() == [[4, 5, 6, 7, 8, 9]] and mine["reference_logprobs"] is batch["reference_logprobs"]


def test_uneven_sequence_refused_with_the_fix():
    from megatron_qwen.errors import UserError
    from megatron_qwen.model.context_parallel import split_sequence

    with pytest.raises(UserError, match=r"10 tokens, not a multiple of 2 x parallel.cp = 4.*pad it"):
        split_sequence(torch.zeros(1, 10), 1, 0, 2)


def _attention(cp: int):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_qwen.model.attention import SDPAttention
    from megatron_qwen.model.qwen import QwenTransformerConfig

    config = QwenTransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                                   num_query_groups=GROUPS, kv_channels=HEAD_DIM, context_parallel_size=cp,
                                   attention_dropout=0.0)
    return SDPAttention(config, 1, AttnMaskType.causal, "self").eval()


def _simulated_cp(monkeypatch, q, k, v, size, rows=None):
    """SDPAttention's context-parallel branch run for every rank of `size` in one process: each rank gets its share
    of q/k/v, the gather returns every rank's share in rank order; the outputs are put back in sequence order."""
    from megatron_qwen.model import context_parallel as cp

    attention = _attention(size)
    out = torch.empty(q.shape[0], q.shape[1], HEADS * HEAD_DIM)
    gathered = {id(t): torch.cat([cp.split_sequence(t, 0, r, size) for r in range(size)]) for t in (k, v)}
    for rank in range(size):
        shares = [cp.split_sequence(t, 0, rank, size) for t in (q, k, v)]
        by_share = {id(shares[1]): gathered[id(k)], id(shares[2]): gathered[id(v)]}
        monkeypatch.setattr(cp, "cp_size", lambda: size)
        monkeypatch.setattr(cp, "cp_rank", lambda rank=rank: rank)
        monkeypatch.setattr(cp, "gather_kv", lambda t: by_share[id(t)])
        with torch.no_grad():
            context = attention(*shares, None, packed_seq_params=rows)
        out[cp.token_positions(q.shape[0] // size, rank, size)] = context
    return out


@pytest.mark.parametrize("size,seq", [(2, 8), (2, 24), (4, 16)])
def test_attention_equals_full_causal_sdpa(monkeypatch, size, seq):
    """Every rank's queries over the gathered keys, reassembled, equal one causal SDPA over the whole sequence
    (grouped-query: 4 query heads over 2 KV heads)."""
    gen = torch.Generator().manual_seed(seq)
    q = torch.randn(seq, 2, HEADS, HEAD_DIM, generator=gen)
    k, v = (torch.randn(seq, 2, GROUPS, HEAD_DIM, generator=gen) for _ in range(2))
    full = F.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3), *(t.repeat_interleave(HEADS // GROUPS, 2).permute(1, 2, 0, 3) for t in (k, v)),
        is_causal=True, scale=1 / math.sqrt(HEAD_DIM))
    reference = full.permute(2, 0, 1, 3).reshape(seq, 2, HEADS * HEAD_DIM)
    assert (_simulated_cp(monkeypatch, q, k, v, size) - reference).abs().max().item() < 1e-6


def test_packed_rows_attend_within_each_sequence(monkeypatch):
    """Packed rows split over 2 CP ranks: causal by global position and within each packed sequence, equal to each
    sequence attended alone (boundaries 0, 5, 12 | 16, 26, 32: rows of 16)."""
    from megatron_qwen.packed_rows import PackedRows

    seq, boundaries = 16, [0, 5, 12, 16, 26, 32]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(seq, 2, HEADS, HEAD_DIM, generator=gen)
    k, v = (torch.randn(seq, 2, GROUPS, HEAD_DIM, generator=gen) for _ in range(2))
    rows = PackedRows.from_boundaries(boundaries, torch.device("cpu"))
    out = _simulated_cp(monkeypatch, q, k, v, 2, rows)
    for row, start, end in rows.segments(seq):
        piece = [t[start:end, row:row + 1] for t in (q, k, v)]
        alone = F.scaled_dot_product_attention(
            piece[0].permute(1, 2, 0, 3),
            *(t.repeat_interleave(HEADS // GROUPS, 2).permute(1, 2, 0, 3) for t in piece[1:]),
            is_causal=True, scale=1 / math.sqrt(HEAD_DIM))
        expected = alone.permute(2, 0, 1, 3).reshape(end - start, HEADS * HEAD_DIM)
        assert (out[start:end, row] - expected).abs().max().item() < 1e-6, (row, start, end)


# --------------------------------------------------------------------------- Transformer Engine's CP (no TE here)


def _te_config(*overrides: str):
    """megatron-core's TransformerConfig of a run on the Transformer Engine spec (its constructor needs no TE)."""
    import dataclasses

    from megatron_qwen.config import load_config
    from megatron_qwen.model.qwen import transformer_config
    from megatron_qwen.platform.runtime import Runtime

    cfg = load_config("configs/tiny.yaml", ["model.seq_length=32", "model.num_attention_heads=4",
                                            "model.num_query_groups=2", *overrides])
    return transformer_config(cfg, dataclasses.replace(Runtime.cpu(), use_te=True))


def test_te_run_passes_context_parallelism_to_megatron_core():
    """On the TE spec, CP=2 sets megatron-core's size and comm type and TE's core attention; pipelines exchange
    tensor shapes (THD micro-batches vary in length). CP=1, LogN or per-layer windows (which TE's attention does not
    compute), and the local spec keep SDPAttention: no comm type."""
    from megatron_qwen.model.qwen import transformer_config
    from megatron_qwen.platform.runtime import Runtime

    config = _te_config("parallel.cp=2", "parallel.cp_comm_type=a2a", "parallel.pp=2", "model.num_layers=2")
    assert (config.context_parallel_size, config.cp_comm_type, config.te_context_parallel) == (2, "a2a", True)
    assert config.hierarchical_context_parallel_sizes is None and config.variable_seq_lengths
    config = _te_config("parallel.cp=2", "parallel.cp_comm_type=all_gather")
    assert (config.cp_comm_type, config.variable_seq_lengths) == ("all_gather", False)
    for overrides in (("parallel.cp=1",), ("parallel.cp=2", "model.use_logn_attn=true"),
                      ("parallel.cp=2", "model.num_layers=2", "model.attention_windows=[8,0]")):
        config = _te_config(*overrides)
        assert (config.cp_comm_type, config.te_context_parallel) == (None, False), overrides
    from megatron_qwen.config import load_config

    local = transformer_config(load_config("configs/tiny.yaml", ["model.seq_length=32", "parallel.cp=2"]),
                               Runtime.cpu())
    assert (local.context_parallel_size, local.cp_comm_type, local.te_context_parallel) == (2, None, False)


def test_cp_comm_type_rules():
    """a2a scatters each TP rank's heads over the CP ranks: refused when they do not divide, naming the fix; a comm
    type set where SDPAttention runs is noted as Transformer Engine's only."""
    from megatron_qwen.config import load_config, validate

    def check(*overrides):
        return validate(load_config("configs/tiny.yaml", ["model.seq_length=48", *overrides]), 4)

    errors, _ = check("parallel.cp=2", "parallel.tp=2", "parallel.cp_comm_type=a2a")  # 2 heads / tp 2 = 1 per rank
    assert any("parallel.cp_comm_type=a2a scatters" in e and "(1 query, 1 key/value)" in e
               and "p2p or all_gather" in e for e in errors), errors
    errors, notes = check("parallel.cp=2", "model.num_attention_heads=4", "parallel.cp_comm_type=a2a")
    assert not errors and any("every layer all-gathers them" in n for n in notes), notes
    errors, notes = check("parallel.cp=3", "parallel.cp_comm_type=a2a")
    assert any("parallel.cp_comm_type=a2a" in e for e in errors)
    assert check("parallel.cp=1", "parallel.cp_comm_type=a2a") == ([], [])


# Three rows of 8 packed with sequences of 3, 2, 3 | 6, 2 | 8 tokens (boundaries over the 24 tokens).
THD_BOUNDARIES = (0, 3, 5, 8, 14, 16, 24)


def test_thd_layout_by_hand():
    """Each packed sequence padded to a multiple of 2 x cp = 4 at cumulative offsets (the padded offsets place them
    in the stream); under SP the last one grows until every CP rank's share divides by TP."""
    from megatron_qwen.model.context_parallel import thd_layout

    layout = thd_layout(THD_BOUNDARIES, 2)
    assert layout.cu_seqlens == THD_BOUNDARIES
    assert layout.cu_seqlens_padded == (0, 4, 8, 12, 20, 24, 32) and layout.max_seqlen == 8
    assert layout.source.tolist() == [0, 1, 2, -1, 3, 4, -1, -1, 5, 6, 7, -1, 8, 9, 10, 11, 12, 13, -1, -1,
                                      14, 15, -1, -1, *range(16, 24)]
    # TP 3 under SP: 32 / 2 = 16 tokens per CP rank do not divide by 3; the last sequence grows by 4 to 12 (a
    # multiple of 4 still), 36 in all: 18 per rank.
    assert thd_layout(THD_BOUNDARIES, 2, 3).cu_seqlens_padded == (0, 4, 8, 12, 20, 24, 36)
    assert thd_layout(THD_BOUNDARIES, 1).cu_seqlens_padded == THD_BOUNDARIES  # no CP: no padding


def test_thd_partition_matches_megatron_core():
    """Rank r holds chunks r and 2cp-1-r of every padded sequence: by hand for cp=2, and for cp=2 and 4 equal to
    the chunks megatron-core's THD RoPE takes for a rank (rope_utils._get_thd_freqs_on_this_cp_rank with offsets:
    the positions TE's thd_get_partitioned_indices gives it)."""
    from megatron.core.models.common.embeddings.rope_utils import _get_thd_freqs_on_this_cp_rank

    from megatron_qwen.model.context_parallel import thd_layout, thd_partitioned_indices

    padded = thd_layout(THD_BOUNDARIES, 2).cu_seqlens_padded
    assert thd_partitioned_indices(padded, 0, 2).tolist() == [0, 3, 4, 7, 8, 11, 12, 13, 18, 19, 20, 23,
                                                              24, 25, 30, 31]
    for size in (2, 4):
        padded = thd_layout(THD_BOUNDARIES, size).cu_seqlens_padded
        stream = torch.arange(padded[-1])
        for rank in range(size):
            expected = torch.cat([_get_thd_freqs_on_this_cp_rank(rank, size, torch.empty((end - start) // size),
                                                                 stream, start)
                                  for start, end in zip(padded, padded[1:])])
            assert torch.equal(thd_partitioned_indices(padded, rank, size), expected), (size, rank)


def test_thd_batch_and_packed_seq_params():
    """A micro-batch of packed rows cut for CP rank 1 of 2 in the THD layout (padding: token 0, never trained),
    and PackedSeqParams as megatron-core's get_thd_batch_on_this_cp_rank builds them (compared at CP=1, where it
    needs no TE)."""
    from megatron.core.utils import get_thd_batch_on_this_cp_rank

    from megatron_qwen.model.context_parallel import split_batch, thd_batch, thd_layout, thd_packed_seq_params
    from megatron_qwen.packed_rows import packed_boundaries

    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1], list(range(8))])
    assert tuple(packed_boundaries(positions)) == THD_BOUNDARIES
    batch = {"tokens": torch.arange(24).view(3, 8) + 100, "loss_mask": torch.ones(3, 8), "position_ids": positions,
             "weight": 0.5}
    layout = thd_layout(THD_BOUNDARIES, 2)
    mine = thd_batch(batch, layout, 1, 2)
    # Stream positions 1, 2 | 5, 6 | 9, 10 | 14, 15, 16, 17 | 21, 22 | 26, 27, 28, 29 of the padded sequences.
    assert mine["tokens"].tolist() == [[101, 102, 104, 0, 106, 107, 110, 111, 112, 113, 115, 0,
                                        118, 119, 120, 121]]
    assert mine["loss_mask"].tolist() == [[1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1]]
    assert mine["weight"] == 0.5

    class Chunk(torch.nn.Module):  # a model chunk as split_batch sees it (DDP-wrapped)
        config = _te_config("parallel.cp=2")

    assert torch.equal(split_batch(batch, 1, 2, model=types.SimpleNamespace(module=Chunk()))["tokens"],
                       mine["tokens"])
    assert split_batch(batch, 1, 2)["tokens"].shape == (3, 4)  # without TE's CP: two chunks of each row
    params = thd_packed_seq_params(layout, torch.device("cpu"))
    assert params.qkv_format == "thd" and params.max_seqlen_q == params.max_seqlen_kv == 8
    assert params.cu_seqlens_q.dtype == torch.int32 and params.cu_seqlens_q_padded.tolist() == list(
        layout.cu_seqlens_padded)
    one = thd_layout(THD_BOUNDARIES, 1)
    cu = torch.tensor(one.cu_seqlens, dtype=torch.int32)
    _, theirs = get_thd_batch_on_this_cp_rank({"tokens": batch["tokens"].view(1, -1)}, cu, cu,
                                              torch.tensor([one.max_seqlen]), cp_size=1, cp_rank=0)
    ours = thd_packed_seq_params(one, torch.device("cpu"))
    for field in ("qkv_format", "max_seqlen_q", "max_seqlen_kv"):
        assert getattr(ours, field) == getattr(theirs, field), field
    for field in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
        assert torch.equal(getattr(ours, field), getattr(theirs, field)), field


REFERENCE = "tp1-pp1-vpp1-cp1"  # CP=1: data-parallel over the 4 ranks
FORWARD_LAYOUTS = ("tp1-pp1-vpp1-cp2", "tp2-pp1-vpp1-cp2-sp", "tp1-pp2-vpp1-cp2")
TRAIN_LAYOUTS = ("tp1-pp1-vpp1-cp2-dopt", "tp2-pp1-vpp1-cp2-sp", "tp1-pp2-vpp2-cp2")
# Saved at step 5 at one CP size, resumed at the other (the same optimizer kind: its state layouts differ).
RESUMED = (f"{REFERENCE}@tp2-pp1-vpp1-cp2-sp", f"tp1-pp1-vpp1-cp2@{REFERENCE}")
STAGE_LAYOUTS = ("tp1-pp1-vpp1-cp2", "tp1-pp2-vpp1-cp2")  # against REFERENCE
CLI_LAYOUTS = ("tp1-pp1-vpp1-cp2", "tp2-pp1-vpp1-cp2-sp")  # `megatron-qwen forward --cp 2`, against --cp 1
PPO_LAYOUT = "tp1-pp1-vpp1-cp2"  # PPO and GRPO, against REFERENCE


@pytest.fixture(scope="module")
def cp_runs(tmp_path_factory):
    """One spawn of 4 ranks: the forward comparisons, then the training runs and the resumed ones."""
    root = tmp_path_factory.mktemp("cp")
    run_torchrun(4, ["tests/parallel/cp_worker.py", "--workdir", str(root), "--forward", ",".join(FORWARD_LAYOUTS),
                     "--resume", "--train", ",".join((REFERENCE, *TRAIN_LAYOUTS, *RESUMED)),
                     "--stages", ",".join((REFERENCE, *STAGE_LAYOUTS)), "--cli-forward", ",".join(CLI_LAYOUTS),
                     "--ppo", PPO_LAYOUT], timeout=900)
    return root


@pytest.mark.parametrize("layout", FORWARD_LAYOUTS)
def test_forward_equals_cp1(cp_runs, layout):
    """Logits at sequence lengths 8, 16 and 32 and the per-token losses of packed SFT rows (through the SFT stage's
    forward step) equal CP=1's at the same positions on every last-stage rank; a 30-token sequence is refused."""
    results = [json.loads((cp_runs / layout / f"forward_rank{r}.json").read_text()) for r in range(4)]
    last_stage = [r for r in results if r]
    assert len(last_stage) == (2 if layout.startswith("tp1-pp2") else 4)
    for result in last_stage:
        for key in ("8", "16", "32", "packed"):
            assert isinstance(result[key], float) and result[key] < 1e-5, (layout, key, result[key])
        if "uneven" in result:
            assert "30 tokens, not a multiple of 2 x parallel.cp = 4" in result["uneven"], result["uneven"]
    assert any("uneven" in r for r in last_stage) != layout.startswith("tp1-pp2")


def _max_relative_difference(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("run", [*TRAIN_LAYOUTS, *RESUMED])
def test_training_steps_equal_cp1(cp_runs, run):
    """Ten optimizer steps (the distributed optimizer on DP x CP, TP with SP, interleaved PP) give CP=1's losses and
    final weights; a run resumed at another CP size from step 5 too."""
    from megatron_qwen.checkpoint.io import read_full_state_dict

    ref_dir = cp_runs / REFERENCE / "train"
    ref_losses = json.loads((ref_dir / "losses.json").read_text())
    ref_final, initial = read_full_state_dict(ref_dir / "final"), read_full_state_dict(ref_dir / "initial")
    assert all(not torch.equal(ref_final[k], initial[k]) for k in ref_final)  # training moved every tensor
    out = cp_runs / run.replace("@", "_from_") / "train"
    losses = json.loads((out / "losses.json").read_text())
    assert list(losses) == list(ref_losses)[-len(losses):] and len(losses) == (5 if "@" in run else 10)
    for step, loss in losses.items():
        assert abs(loss - ref_losses[step]) < 1e-5, (run, step, loss, ref_losses[step])
    final = read_full_state_dict(out / "final")
    assert final.keys() == ref_final.keys()
    diffs = {k: _max_relative_difference(final[k], ref_final[k]) for k in ref_final}
    assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.parametrize("layout", STAGE_LAYOUTS)
def test_reward_and_dpo_steps_equal_cp1(cp_runs, layout):
    """One reward-model and one DPO step (the stages' forward steps and losses, DPO's reference preparation) at
    CP=2 give CP=1's loss, accuracy, margins and gradient norm: each sequence's sum is taken over the CP group and
    the gradient counted once."""
    reference = json.loads((cp_runs / REFERENCE / "stages.json").read_text())
    result = json.loads((cp_runs / layout / "stages.json").read_text())
    for stage in ("reward", "dpo"):
        assert reference[stage]["grad_norm"] > 0
        for key, expected in reference[stage].items():
            assert abs(result[stage][key] - expected) <= 1e-5 * max(1.0, abs(expected)), (stage, key, result[stage])


@pytest.mark.parametrize("layout", CLI_LAYOUTS)
def test_forward_command_at_cp2_equals_cp1(cp_runs, layout):
    """`megatron-qwen forward --cp 2` (alone, and with TP=2 and SP) writes the logits of --cp 1, full vocabulary,
    for rows of 30 tokens (padded to cut into 2 x CP chunks, the padding cut off again)."""
    import numpy as np

    reference = np.load(cp_runs / "cli_forward" / f"{REFERENCE}.npy")
    got = np.load(cp_runs / "cli_forward" / f"{layout}.npy")
    assert reference.shape == got.shape == (2, 30, 1024)
    assert np.abs(got - reference).max() < 1e-5 and np.abs(reference).max() > 0.1


def test_forward_command_refuses_generation_at_cp(capsys):
    """--generate decodes with a KV cache, which context parallelism does not split: refused, naming --cp 1."""
    from megatron_qwen.cli import forward

    with pytest.raises(SystemExit):
        forward.parse_args(["--ckpt", "c", "--tokens", "t.npy", "--out", "o.npy", "--generate", "2", "--cp", "2"])
    assert "run --generate at --cp 1" in capsys.readouterr().err
    assert forward.parse_args(["--ckpt", "c", "--tokens", "t.npy", "--out", "o.npy", "--cp", "2"]).cp == 2


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_ppo_and_grpo_at_cp2_equal_cp1(cp_runs, estimator):
    """Two PPO steps (GAE with a value model) and two GRPO steps at CP=2 give CP=1's rollouts, rewards, KL, losses
    and gradient norms (fp32 summation order apart): rollouts generated on whole sequences, shared out over the CP
    ranks and exchanged; old/reference log-probabilities, values and the updates on each rank's share of the rows."""
    def metrics(layout):
        lines = (cp_runs / "ppo" / estimator / layout / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r for r in map(json.loads, lines)}

    reference, got = metrics(REFERENCE), metrics(PPO_LAYOUT)
    assert sorted(got) == sorted(reference) == [1, 2]
    keys = ["reward_mean", "response_length", "kl_to_reference", "entropy", "policy_loss", "policy_grad_norm"]
    if estimator == "gae":
        keys += ["value_loss", "value_grad_norm", "explained_variance"]
    for step in (1, 2):
        for key in keys:
            assert got[step][key] == pytest.approx(reference[step][key], rel=1e-4, abs=1e-6), (step, key)
    # The first update moved the policy away from the reference, and every update had a gradient.
    assert reference[2]["kl_to_reference"] > 1e-4 and min(reference[s]["policy_grad_norm"] for s in (1, 2)) > 0.1
