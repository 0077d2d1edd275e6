"""Packed SFT rows without a dense mask: the SFT stage passes the conversations' boundaries
(`PackedRows`, read from the position ids on the host) and the attention runs each conversation causally
within itself. Against each conversation run alone, and against the dense block-diagonal mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_sft import MODEL, digit_task, write_jsonl


def test_boundaries_from_position_ids_by_hand():
    from megatron_qwen.data.chat_datasets import packed_rows

    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4],  # three conversations: 3, 2 and 5 tokens
                              [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])  # one (padding continues its positions)
    rows = packed_rows(positions, torch.device("cpu"))
    assert rows.boundaries == (0, 3, 5, 10, 20) and rows.cu_seqlens_q.tolist() == [0, 3, 5, 10, 20]
    assert rows.cu_seqlens_q.dtype == torch.int32 and rows.max_seqlen_q == rows.max_seqlen_kv == 10
    assert list(rows.segments(10)) == [(0, 0, 3), (0, 3, 5), (0, 5, 10), (1, 0, 10)]
    assert packed_rows(positions[1:], torch.device("cpu")) is None  # nothing packed: plain causal attention


def test_varlen_kernel_only_where_it_takes_a_scale_and_a_causal_window(monkeypatch):
    """torch 2.10's varlen_attn takes is_causal and no scale: calling it as torch >= 2.11's would raise a
    TypeError at the first packed step, so packed rows take the per-sequence path there."""
    from torch.nn.attention.varlen import varlen_attn

    from megatron_qwen.model import attention

    def torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        raise AssertionError("never called")

    def torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                   window_size=(-1, -1), enable_gqa=False):
        raise AssertionError("never called")

    def scale_only(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None):
        raise AssertionError("never called")

    assert attention.varlen_kernel(torch_2_11) is torch_2_11
    assert attention.varlen_kernel(varlen_attn) is varlen_attn  # this torch's
    for older in (torch_2_10, scale_only):
        assert attention.varlen_kernel(older) is None, older.__name__
    monkeypatch.setattr(attention, "varlen_attn", torch_2_10)  # what `_packed` asks for
    assert attention.varlen_kernel() is None
    monkeypatch.setattr(attention, "varlen_attn", None)  # torch without the module
    assert attention.varlen_kernel() is None


@pytest.mark.usefixtures("single_rank")
def test_packed_rows_attend_per_conversation_without_a_dense_mask(tmp_path, monkeypatch):
    from megatron_qwen.config import load_config
    from megatron_qwen.data import preprocess as pp
    from megatron_qwen.data.chat_datasets import build_sft_datasets, packed_attention_mask
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.stages.sft import sft_forward_step

    records = digit_task(np.random.default_rng(0), 9)
    pp.preprocess([str(write_jsonl(tmp_path / "chat.jsonl", records))], str(tmp_path / "chat"), mode="chat")
    common = ["model.padded_vocab_size=151936", *MODEL, "data.split=100,0,0", "training.global_batch_size=2",
              "training.train_iters=1", f"data.paths=[{tmp_path / 'chat'}]"]
    packed_ds, _ = build_sft_datasets(load_config("configs/tiny.yaml", [*common, "sft.pack=true"]))
    alone_ds, _ = build_sft_datasets(load_config("configs/tiny.yaml", [*common, "sft.pack=false"]))
    (model,) = build_model(load_config("configs/tiny.yaml", common), Runtime.cpu(), rope_at_positions=True)
    model.eval()

    calls = []
    sdpa = F.scaled_dot_product_attention

    def recorded(q, k, v, attn_mask=None, **kwargs):
        calls.append((attn_mask, q.shape[-2], kwargs.get("is_causal")))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recorded)

    def stage_losses(item) -> torch.Tensor:
        """Per-token losses through the SFT stage's own forward step."""
        batch = {k: torch.as_tensor(v)[None] for k, v in item.items()}
        with torch.no_grad():
            out, _ = sft_forward_step(iter([batch]), model)
        return out[0]

    def end_of_last(tokens) -> int:
        return int(np.flatnonzero(tokens == 151645)[-1]) + 2  # a conversation ends with "<|im_end|>\n"

    reference = {}
    for i in range(len(alone_ds)):
        item = alone_ds[i]
        end = end_of_last(item["tokens"])
        reference[tuple(item["tokens"][:end])] = stage_losses(item)[: end - 1]
    assert len(reference) == 9

    compared = packed = 0
    seq = len(packed_ds[0]["tokens"])
    for i in range(len(packed_ds)):
        item = packed_ds[i]
        calls.clear()
        out = stage_losses(item)
        starts = np.flatnonzero(item["position_ids"] == 0).tolist()
        if len(starts) > 1:
            packed += 1
            # One causal SDPA call per conversation (the last one with the padding) in each of the 2 layers,
            # none with a mask, none over the whole row.
            assert all(mask is None and causal for mask, _, causal in calls), calls
            assert max(length for _, length, _ in calls) < seq and len(calls) == 2 * len(starts)
            # The dense block-diagonal mask gives the same losses.
            batch = {k: torch.as_tensor(v)[None] for k, v in item.items()}
            with torch.no_grad():
                dense = model(batch["tokens"], batch["position_ids"], packed_attention_mask(batch["position_ids"]),
                              labels=batch["labels"])[0]
            assert (dense - out).abs().max().item() < 1e-5
        for start, end in zip(starts, starts[1:] + [end_of_last(item["tokens"])]):
            ref = reference[tuple(item["tokens"][start:end])]
            assert (out[start : end - 1] - ref).abs().max().item() < 1e-5
            compared += 1
    assert compared == 9 and packed >= 2
