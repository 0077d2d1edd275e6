"""Layout-independent initialisation (megatron_qwen.model.init) piece by piece; the whole model at every
layout against the single-process build is tests/test_parallel_equivalence.py."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_qwen.model import init


@pytest.mark.parametrize(
    "key, expected",
    [
        ("embedding.word_embeddings.weight", (0.0, 0.02)),
        ("decoder.layers.self_attention.linear_qkv.weight", (0.0, 0.02)),
        ("decoder.layers.self_attention.linear_qkv.bias", (0.0, 0.0)),
        ("decoder.layers.self_attention.linear_qkv.layer_norm_weight", (1.0, 0.0)),  # ln_1 under TE's fused name
        ("decoder.layers.self_attention.linear_proj.weight", (0.0, 0.02 / math.sqrt(2 * 8))),  # attn.c_proj
        ("decoder.layers.mlp.linear_fc1.layer_norm_weight", (1.0, 0.0)),
        ("decoder.layers.mlp.linear_fc1.weight", (0.0, 0.02)),
        ("decoder.layers.mlp.linear_fc2.weight", (0.0, 0.02 / math.sqrt(2 * 8))),  # mlp.c_proj
        ("decoder.final_layernorm.weight", (1.0, 0.0)),
        ("output_layer.weight", (0.0, 0.02)),
        ("reward_head.weight", (0.0, 0.02)),
        ("value.decoder.final_layernorm.weight", (1.0, 0.0)),  # a unit's namespace does not change the rule
    ],
)
def test_qwen_v1_distribution_per_tensor(key, expected):
    assert init.initial_distribution(key, 0.02, 8) == pytest.approx(expected)


def test_any_region_equals_the_same_region_of_the_whole_tensor(monkeypatch):
    """Shards drawn alone (rows, columns, both, across block boundaries) are slices of the whole tensor."""
    monkeypatch.setattr(init, "BLOCK_ELEMENTS", 12)  # 5-column rows: blocks of 2 rows
    shape, cpu = (11, 5), torch.device("cpu")
    whole = init.draw_region(shape, (slice(0, 11), slice(0, 5)), 1.0, 7, "w", (3,), cpu)
    assert whole.shape == shape and whole.std() > 0.5
    for rows, cols in [((0, 11), (2, 4)), ((3, 8), (0, 5)), ((1, 2), (4, 5)), ((4, 11), (1, 3)), ((9, 11), (0, 1))]:
        region = (slice(*rows), slice(*cols))
        assert torch.equal(init.draw_region(shape, region, 1.0, 7, "w", (3,), cpu), whole[region]), region
    # The draw depends on the seed, the key and the layer, and nothing else.
    full = (slice(0, 11), slice(0, 5))
    assert torch.equal(init.draw_region(shape, full, 1.0, 7, "w", (3,), cpu), whole)
    for other in [(8, "w", (3,)), (7, "v", (3,)), (7, "w", (4,))]:
        assert not torch.equal(init.draw_region(shape, full, 1.0, other[0], other[1], other[2], cpu), whole)


def test_block_seeds_are_the_same_in_every_process():
    """Ranks are separate processes: the seed must not depend on Python's per-process salted hash()."""
    import os
    import subprocess
    import sys

    probe = "from megatron_qwen.model.init import block_seed; print(block_seed(1234, 'output_layer.weight', (), 0))"
    seeds = {
        subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONHASHSEED": salt},
                       capture_output=True, text=True, check=True).stdout.strip()
        for salt in ("1", "2")
    }
    assert seeds == {str(init.block_seed(1234, "output_layer.weight", (), 0))}


@pytest.mark.usefixtures("single_rank")
def test_every_parameter_is_initialised_and_unrelated_to_the_global_rng():
    from megatron_qwen.config import load_config
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime

    cfg = load_config("configs/tiny.yaml", ["model.padded_vocab_size=1024", "model.num_layers=2"])
    builds = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        (model,) = build_model(cfg, Runtime.cpu(), head="scalar")
        builds.append(dict(model.named_parameters()))
    assert builds[0].keys() == builds[1].keys() and "reward_head.weight" in builds[0]
    assert all(torch.equal(builds[0][k], builds[1][k]) for k in builds[0])
    other = load_config("configs/tiny.yaml", ["model.padded_vocab_size=1024", "model.num_layers=2", "training.seed=7"])
    (model,) = build_model(other, Runtime.cpu(), head="scalar")
    assert not torch.equal(dict(model.named_parameters())["reward_head.weight"], builds[0]["reward_head.weight"])
