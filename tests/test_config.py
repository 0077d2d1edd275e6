"""Config loading, overrides and validation: every rule names the value and the fix."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_qwen.config import ConfigError, load_config, padded_vocab_size, resolve, validate
from test_parallel_equivalence import LAYOUTS

EQUIVALENCE_LAYOUTS = sorted({name.removesuffix("-p2p") for name in LAYOUTS})  # p2p overlap is no layout size

SIZES = {
    # name: (hidden, heads, layers, ffn, vocab, rope base, eps)
    "qwen-1_8b": (2048, 16, 24, 5504, 151936, 10000, 1e-6),
    "qwen-7b": (4096, 32, 32, 11008, 151936, 10000, 1e-6),
    "qwen-14b": (5120, 40, 40, 13696, 152064, 10000, 1e-6),
    "qwen-72b": (8192, 64, 80, 24576, 152064, 1000000, 1e-5),
}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_released_sizes(name):
    m = load_config(f"configs/{name}.yaml").model
    assert (m.hidden_size, m.num_attention_heads, m.num_layers, m.ffn_hidden_size, m.padded_vocab_size, m.rotary_base,
            m.norm_epsilon) == SIZES[name]
    assert m.head_dim == 128


def test_seven_b_enables_long_context_tricks_and_72b_does_not():
    assert load_config("configs/qwen-7b.yaml").model.use_dynamic_ntk
    assert load_config("configs/qwen-7b.yaml").model.use_logn_attn
    m72 = load_config("configs/qwen-72b.yaml").model
    assert not m72.use_dynamic_ntk and not m72.use_logn_attn and m72.seq_length == 8192


def test_recipe_defaults():
    t = load_config("configs/qwen-7b.yaml").training
    assert (t.adam_beta1, t.adam_beta2, t.adam_eps, t.weight_decay, t.clip_grad) == (0.9, 0.95, 1e-8, 0.1, 1.0)
    assert (t.lr, t.min_lr, t.lr_warmup_iters) == (3e-4, 3e-5, 2000)


@pytest.mark.parametrize("name", EQUIVALENCE_LAYOUTS)
def test_tiny_runs_every_test_layout(name):
    """Each layout of the parallel-equivalence test is valid for the tiny model on its 4 ranks and resolves to
    the sizes named, data parallelism taking what TP x PP leaves."""
    tp, pp, vpp, sp = (int(part[len(key):]) for part, key in zip(name.split("-"), ("tp", "pp", "vpp", "sp")))
    overrides = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.vpp={vpp}",
                 f"parallel.sp={str(bool(sp)).lower()}"]
    cfg, layout, _ = resolve(load_config("configs/tiny.yaml", overrides), 4)
    sizes = (layout.world_size, layout.tp, layout.pp, layout.vpp, layout.dp, layout.sp)
    assert sizes == (4, tp, pp, vpp, 4 // (tp * pp), bool(sp)), sizes
    assert cfg.model.num_layers % (pp * vpp) == 0 and cfg.model.padded_vocab_size % tp == 0


def test_dotted_overrides_are_typed():
    cfg = load_config("configs/tiny.yaml",
                      ["parallel.tp=2", "parallel.sp=true", "training.lr=1e-4", "data.paths=[1.0, a, 2, b]"])
    assert cfg.parallel.tp == 2 and cfg.parallel.sp is True and cfg.training.lr == 1e-4
    assert cfg.data.paths == [1.0, "a", 2, "b"]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["parallel.tpp=2"], "unknown key 'parallel.tpp'"),
        (["parallel.tp=two"], "parallel.tp='two': expected an integer"),
        (["parallel.sp=yes please"], "expected true or false"),
        (["nonsense"], "section.key=value"),
    ],
)
def test_bad_keys_and_types(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config("configs/tiny.yaml", overrides)


def _errors(overrides, world=None, path="configs/tiny.yaml"):
    return validate(load_config(path, overrides), world)


@pytest.mark.parametrize(
    "overrides, world, fragment",
    [
        (["parallel.tp=4"], None, "parallel.tp=4 does not divide model.num_attention_heads=2"),
        (["parallel.tp=2", "model.ffn_hidden_size=513"], None, "does not divide model.ffn_hidden_size=513"),
        (["parallel.pp=3"], None, "parallel.pp=3 x parallel.vpp=1 = 3 does not divide model.num_layers=4"),
        (["parallel.pp=2", "parallel.vpp=4"], None, "= 8 does not divide model.num_layers=4"),
        (["parallel.vpp=2"], None, "parallel.vpp=2 needs pipeline parallelism"),
        (["parallel.sp=true"], None, "parallel.sp=true needs tensor parallelism"),
        (["parallel.tp=2"], 3, "world size 3 is not a multiple of parallel.tp x parallel.pp x parallel.cp = 2"),
        (["parallel.cp=2", "parallel.tp=2"], 6,
         "world size 6 is not a multiple of parallel.tp x parallel.pp x parallel.cp = 4"),
        (["parallel.cp=3"], None, "not divisible by 2 x parallel.cp = 6"),
        (["parallel.cp=2", "parallel.tp=4", "model.num_attention_heads=4", "parallel.sp=true", "model.seq_length=68"],
         None, "choose a seq_length that is a multiple of 8"),
        (["parallel.ep=2"], None, "this model has none"),
        (["model.num_experts=6", "model.moe_ffn_hidden_size=64", "parallel.ep=4"], None,
         "parallel.ep=4 does not divide model.num_experts=6; choose ep from [1, 2, 3, 6]"),
        (["model.num_experts=4", "model.moe_ffn_hidden_size=64", "model.moe_router_topk=5"], None,
         "model.moe_router_topk=5 must be between 1 and model.num_experts=4"),
        (["model.num_experts=4"], None, "model.moe_ffn_hidden_size (one expert's width"),
        (["model.num_experts=4", "model.moe_ffn_hidden_size=63", "parallel.tp=2"], None,
         "parallel.etp=2 does not divide model.moe_ffn_hidden_size=63"),
        (["model.num_experts=4", "model.moe_ffn_hidden_size=64", "model.moe_shared_expert_gate=true"], None,
         "needs a shared expert"),
        (["model.num_experts=4", "model.moe_ffn_hidden_size=64", "model.moe_mlp_only_layers=[0, 9]"], None,
         "model.moe_mlp_only_layers has [9]"),
        (["model.num_experts=4", "model.moe_ffn_hidden_size=64", "model.moe_decoder_sparse_step=8"], None,
         "no layer is MoE"),
        (["model.num_experts=4", "model.moe_ffn_hidden_size=64", "parallel.ep=4", "parallel.etp=1"], 2,
         "not a multiple of parallel.etp x parallel.ep x parallel.pp = 4"),
        (["training.global_batch_size=6", "training.micro_batch_size=2"], 2,
         "not a multiple of micro_batch_size=2 x data-parallel size 2; use a multiple of 4"),
        (["parallel.pp=2", "parallel.vpp=2", "training.global_batch_size=6", "training.micro_batch_size=2"], 2,
         "multiple of parallel.pp=2"),
        (["model.seq_length=16384"], None, "exceeds model.max_position_embeddings=8192"),
    ],
)
def test_validation_messages(overrides, world, fragment):
    errors, _ = _errors(overrides, world)
    assert any(fragment in e for e in errors), errors


def test_vocab_kept_when_tp_divides_it_else_padded_with_a_note():
    assert padded_vocab_size(151936, 8) == 151936
    assert padded_vocab_size(151851, 2) == 151852
    cfg, layout, notes = resolve(load_config("configs/tiny.yaml", ["parallel.tp=2", "model.padded_vocab_size=1001"]), 2)
    assert cfg.model.padded_vocab_size == 1002 and layout.dp == 1
    assert any("padded up to 1002" in n for n in notes)
    cfg, _, notes = resolve(load_config("configs/qwen-72b.yaml"), 64)
    assert cfg.model.padded_vocab_size == 152064 and not notes


def test_resolve_layout():
    _, layout, _ = resolve(load_config("configs/qwen-72b.yaml"), 256)
    assert (layout.tp, layout.pp, layout.dp, layout.sp) == (8, 4, 8, True)


def test_context_and_expert_parallel_layout():
    moe = ["model.num_experts=8", "model.moe_ffn_hidden_size=64", "parallel.ep=4", "parallel.etp=1"]
    _, layout, _ = resolve(load_config("configs/tiny.yaml", ["parallel.tp=2", "parallel.cp=2", *moe]), 8)
    # DP is what TP x PP x CP leaves; the experts' data parallelism what ETP x EP x PP leaves.
    assert (layout.tp, layout.cp, layout.dp, layout.ep, layout.etp, layout.expert_dp) == (2, 2, 2, 4, 1, 2)


def test_moe_layers_follow_sparse_step_and_dense_list():
    # transformers' Qwen2-MoE: layer i is sparse unless listed in mlp_only_layers or (i + 1) % step != 0.
    cfg = load_config("configs/tiny.yaml", ["model.num_experts=4", "model.moe_ffn_hidden_size=64",
                                            "model.moe_decoder_sparse_step=2", "model.moe_mlp_only_layers=[3]"])
    assert cfg.model.moe_layers == [False, True, False, False]
    assert load_config("configs/tiny.yaml").model.moe_layers == [False] * 4


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as info:
        resolve(load_config("configs/tiny.yaml", ["parallel.tp=3", "parallel.pp=3"]), 5)
    assert len(info.value.problems) >= 3


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "megatron_qwen.config", *args], capture_output=True, text=True)


def test_cli_prints_resolved_config():
    proc = run_cli("configs/qwen-7b.yaml", "parallel.tp=4", "--world-size", "16")
    assert proc.returncode == 0, proc.stderr
    assert "num_layers: 32" in proc.stdout and "dp: 4" in proc.stdout


def test_cli_errors_exit_2():
    proc = run_cli("configs/qwen-7b.yaml", "parallel.tp=3", "--world-size", "16")
    assert proc.returncode == 2
    assert "parallel.tp=3 does not divide model.num_attention_heads=32" in proc.stderr
    assert run_cli("configs/missing.yaml").returncode == 2
