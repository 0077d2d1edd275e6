"""Training with low-rank adapters (`peft.*`, megatron_qwen/model/lora.py) on gloo CPU ranks.

One optimizer step at TP=2 x PP=2 with SP (and two more layouts) against one rank: loss, gradient norm and every
adapter after the step, with the base weights bit-identical and only the adapters in DDP's buffers and Adam's
state. Then the stages: SFT with adapters learns the synthetic chat task, DPO's first step from a reference that
is the policy with its adapters off has loss ln 2, PPO with a LoRA policy raises the rule reward; adapter-only
checkpoints (small, naming their base) resume at another layout, and a base with another fingerprint is refused.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

import pytest
import torch

from spawn import REPO, run_torchrun

WORKER = str(Path(__file__).parent / "parallel" / "lora_worker.py")
LAYOUTS = {"tp2-pp2-sp": "2,2,1,1,0,0", "tp2-sp-dp2-distopt": "2,1,1,1,1,0", "pp2-vpp2-dp2": "1,2,2,0,0,0"}
FP8 = {"tp2-pp2-sp-fp8": "2,2,1,1,0,1"}  # the base's GEMMs in FP8 (torchao, the local spec), the adapters' in fp32
# The worker's tiny Qwen2-MoE (shared expert adapted, routed experts frozen) at TP=2 x EP=2 with SP.
MOE_LAYOUTS = {"moe-tp2-ep2-sp": "2,1,1,1,0,0,2"}


def max_relative_difference(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """The worker's reference (one rank) and its layouts (four ranks, one spawn): their directory."""
    root = tmp_path_factory.mktemp("lora-step")
    run_torchrun(1, [WORKER, "--workdir", str(root), "--reference"])
    run_torchrun(4, [WORKER, "--workdir", str(root), "--layouts",
                     ";".join(f"{name}:{sizes}" for name, sizes in {**LAYOUTS, **FP8, **MOE_LAYOUTS}.items())])
    return root


def assert_layouts_equal_one_rank(one_step: Path, layouts, reference: str, init_name: str, expected: int) -> dict:
    """Each of `layouts`' one step equals the one-rank `reference`'s (loss, gradient norm, every adapter after the
    step and, without the distributed optimizer, its reduced gradient, within 1e-5 relative), the base weights
    bit-identical; the reference holds `expected` adapter tensors and moved each. Returns the checkpoint's
    tensors before the step."""
    from megatron_qwen.checkpoint.io import read_full_state_dict
    from megatron_qwen.checkpoint.adapters import is_adapter_key

    ref = json.loads((one_step / reference / "reports.json").read_text())["ranks"][0]
    init = read_full_state_dict(one_step / init_name)
    ref_after = read_full_state_dict(one_step / reference / "after")
    ref_grads = read_full_state_dict(one_step / reference / "grads")
    adapters = sorted(k for k in init if is_adapter_key(k))
    assert len(adapters) == expected, adapters
    # The reference moved every adapter (A too: B started nonzero) and kept the base bit for bit.
    assert all(not torch.equal(ref_after[k], init[k]) and ref_grads[k].abs().max() > 0 for k in adapters)
    assert all(torch.equal(ref_after[k], init[k]) for k in init if k not in adapters)
    for name in layouts:
        got = json.loads((one_step / name / "reports.json").read_text())["ranks"][0]
        assert got["updated"]
        assert abs(got["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (name, got["loss"], ref["loss"])
        assert abs(got["grad_norm"] - ref["grad_norm"]) <= 1e-5 * ref["grad_norm"], (name, got, ref)
        after = read_full_state_dict(one_step / name / "after")
        assert after.keys() == init.keys()
        assert all(torch.equal(after[key], init[key]) for key in init if key not in adapters), name
        worst = {"weights": max(max_relative_difference(after[key], ref_after[key]) for key in adapters)}
        if (one_step / name / "grads").exists():  # the adapters' reduced gradients (without the distributed optimizer)
            grads = read_full_state_dict(one_step / name / "grads")
            worst["gradients"] = max(max_relative_difference(grads[key], ref_grads[key]) for key in adapters)
        print(f"{name}: loss {got['loss']} (one rank {ref['loss']}), grad norm relative difference "
              f"{abs(got['grad_norm'] - ref['grad_norm']) / ref['grad_norm']:.1e}, worst adapter "
              + ", ".join(f"{what} {value:.1e}" for what, value in worst.items()))
        assert max(worst.values()) < 1e-5, (name, worst)
    return init


@pytest.mark.parallel
def test_one_step_at_tp2_pp2_sp_equals_one_rank(one_step):
    # q, k, v, o, gate, up, down: an A and a B each, layers stacked.
    assert_layouts_equal_one_rank(one_step, LAYOUTS, "reference", "init", 14)


@pytest.mark.parallel
def test_one_step_of_a_moe_with_shared_expert_adapters_at_tp2_ep2_sp_equals_one_rank(one_step):
    """The tiny Qwen2-MoE (layers 0, 2, 3 MoE with a gated shared expert, layer 1 dense) at TP=2 x EP=2 with SP:
    its adapters (attention, the dense MLP, the shared experts) step as on one rank; the routed experts, routers
    and shared-expert gates stay bit-identical."""
    init = assert_layouts_equal_one_rank(one_step, MOE_LAYOUTS, "reference-moe", "init-moe",
                                         2 * (4 * 4 + 3 * 4))  # per layer: q, k, v, o + 3 MLP projections
    shared = [k for k in init if ".shared_experts." in k and ".adapter." in k]
    assert len(shared) == 2 * 3 * 3, shared  # 3 MoE layers x gate, up, down x A, B
    assert any(".experts." in k and ".shared_experts." not in k for k in init)  # routed experts exist, unadapted


@pytest.mark.parallel
def test_adapters_train_on_fp8_base_weights(one_step):
    from megatron_qwen.checkpoint.io import read_full_state_dict
    from megatron_qwen.checkpoint.adapters import is_adapter_key

    ref = json.loads((one_step / "reference" / "reports.json").read_text())["ranks"][0]
    init = read_full_state_dict(one_step / "init")
    for name in FP8:
        got = json.loads((one_step / name / "reports.json").read_text())["ranks"][0]
        # FP8 rounds the base's GEMMs (e4m3: 3 mantissa bits), not the parallelism: the loss within 1 %.
        assert got["updated"] and abs(got["loss"] - ref["loss"]) < 1e-2 * ref["loss"], (got["loss"], ref["loss"])
        after = read_full_state_dict(one_step / name / "after")
        assert all(torch.equal(after[k], init[k]) != is_adapter_key(k) for k in init), name


@pytest.mark.parallel
def test_only_adapters_get_gradients_and_optimizer_state(one_step):
    for name in ["reference", "reference-moe", *LAYOUTS, *FP8, *MOE_LAYOUTS]:
        for rank, checks in enumerate(json.loads((one_step / name / "reports.json").read_text())["ranks"]):
            assert checks["trainable_not_adapters"] == [], (name, rank)
            assert checks["main_grads_not_adapters"] == [], (name, rank)
            assert checks["adapters_without_main_grad"] == 0, (name, rank)
            # Adam's moments cover exactly the adapters (summed over DP with the distributed optimizer).
            assert checks["moment_elements"] == checks["adapter_elements"] > 0, (name, rank, checks)


# --------------------------------------------------------------------------- SFT


import test_sft  # noqa: E402 - its module-scoped chat shards, made here once as well
from test_sft import MODEL as SFT_MODEL  # noqa: E402
from test_sft import SEQ, exact_match  # noqa: E402

digit_data = test_sft.digit_data
SFT_STEPS = 300
BASE_STEPS = 80
PPO_STEPS = 24
LORA = ["peft.method=lora", "peft.rank=16", "peft.alpha=32"]


def seeded(seed: int | None) -> list[str]:
    return [] if seed is None else [f"training.seed={seed}"]


def sft_overrides(dense, vocab, run_dir, *extra) -> list[str]:
    return [f"data.paths=[{dense / 'train'}]", f"model.padded_vocab_size={vocab}", *SFT_MODEL, "data.split=100,0,0",
            "training.micro_batch_size=4", "training.global_batch_size=8", "data.allow_repeat=true",
            "training.lr_warmup_iters=10", "training.weight_decay=0.0",
            "logging.log_interval=10", f"logging.run_dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def sft_base_at(digit_data, tmp_path_factory):
    """sft_base_at(seed): the base the LoRA run at training.seed=seed starts from: BASE_STEPS of full SFT on the
    chat task (at seed 1000 + seed), which teach the conversation format and the digit tokens but no held-out reply
    (measured: exact match 0.0). A random base is no base for LoRA here: its frozen random embeddings and output
    layer held the adapters at a loss of 2.86 for 400 steps (measured), far from the task."""
    import functools

    dense, _, vocab = digit_data

    @functools.cache
    def make(seed):
        run_dir = tmp_path_factory.mktemp("sft-base")
        run_torchrun(1, ["-m", "megatron_qwen.stages.sft", "configs/tiny.yaml",
                         *sft_overrides(dense, vocab, run_dir, f"training.train_iters={BASE_STEPS}", "training.lr=1e-3",
                                        "training.min_lr=1e-3"),
                         f"training.seed={1000 if seed is None else 1000 + seed}"])
        return run_dir / "checkpoints" / f"iter_{BASE_STEPS:07d}"

    return make


@pytest.mark.parallel
@pytest.mark.usefixtures("single_rank")
def test_sft_with_adapters_learns_the_chat_task(digit_data, sft_base_at, training_seed, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_qwen.checkpoint.io import load_model, read_full_state_dict
    from megatron_qwen.config import load_config
    from megatron_qwen.errors import CheckpointError
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime

    dense, remap, vocab = digit_data
    base = sft_base_at(training_seed)
    overrides = sft_overrides(dense, vocab, tmp_path, f"training.init_from={base}", *LORA, "training.lr=5e-3",
                              "training.min_lr=5e-4", f"training.train_iters={SFT_STEPS}",
                              f"training.save_interval={SFT_STEPS // 2}", *seeded(training_seed))
    run_torchrun(1, ["-m", "megatron_qwen.stages.sft", "configs/tiny.yaml", *overrides])

    heldout = IndexedDataset(str(dense / "heldout_chat_tokens_document"))
    tokens = torch.zeros(len(heldout), SEQ, dtype=torch.long)
    for i in range(len(heldout)):
        tokens[i, : len(heldout[i])] = torch.as_tensor(heldout[i].astype(np.int64))
    chunks = build_model(load_config("configs/tiny.yaml", overrides), Runtime.cpu(), rope_at_positions=True,
                         adapters=True)
    for chunk in chunks:
        chunk.eval()
    load_model(chunks, base)  # the base, the adapters as they start (B = 0: the base's outputs)
    untrained = exact_match(chunks, tokens, remap)
    scores = {}
    for step in (SFT_STEPS // 2, SFT_STEPS):
        load_model(chunks, tmp_path / "checkpoints" / f"iter_{step:07d}")  # base from adapter_base.json, adapters
        scores[step] = exact_match(chunks, tokens, remap)
    print(f"held-out exact match with adapters: {scores} (the base: {untrained:.3f})")
    assert untrained < 0.05
    assert scores[SFT_STEPS] > 0.9, scores  # measured 0.995
    # A model without adapters is not silently given the base alone.
    with pytest.raises(CheckpointError, match="holds LoRA adapters alone, and this model has none"):
        load_model(build_model(load_config("configs/tiny.yaml", overrides), Runtime.cpu()),
                   tmp_path / "checkpoints" / f"iter_{SFT_STEPS:07d}")
    # The adapter-only checkpoint: adapters, their optimizer state and the loop state; the base left where it is.
    saved = read_full_state_dict(tmp_path / "checkpoints" / f"iter_{SFT_STEPS:07d}")
    assert saved and all(".adapter." in key for key in saved), [k for k in saved if ".adapter." not in k][:5]


# --------------------------------------------------------------------------- DPO and PPO: the reference is the base


import test_ppo  # noqa: E402
import test_reward  # noqa: E402

data = test_reward.data  # the reward test's preference pairs and language models, made here once as well
language_model_at = test_reward.language_model_at


@pytest.mark.parallel
def test_dpo_with_adapters_starts_at_ln2_from_the_adapters_off(data, language_model_at, tmp_path):
    out = run_torchrun(1, ["-m", "megatron_qwen.stages.dpo", "configs/tiny.yaml", *test_reward.overrides(
        data, tmp_path, f"training.init_from={language_model_at(1000)}", *LORA, "training.train_iters=3",
        "training.lr=1e-2", "training.lr_warmup_iters=0", "training.weight_decay=0.0")])
    assert "the reference model is the policy model with its adapters off" in out.stdout
    curve = test_reward.metrics(tmp_path)
    first = curve[1]
    # Adapters start with B = 0: the policy is its base exactly, so the margins are exactly 0 and the loss ln 2.
    assert first["chosen_reward"] == 0.0 and first["rejected_reward"] == 0.0 and first["margin"] == 0.0, first
    assert abs(first["loss"] - math.log(2)) < 1e-7, first["loss"]
    # Once the adapters moved, the reference (adapters off) no longer equals the policy: a reference that ran with
    # the adapters on would keep every margin at exactly 0.
    assert curve[3]["margin"] != 0.0 and curve[3]["loss"] != first["loss"], curve[3]


@pytest.fixture(scope="module")
def ppo_start(tmp_path_factory):
    """The PPO test's prompts and a random policy checkpoint (the base of the LoRA policy), its weights drawn with
    std 0.1. At the default 0.02 the frozen output layer's logits span a few tenths of a nat whatever the hidden
    state, so no adapter can make the good tokens likely (measured: reward 0.26 -> 0.31 in 24 steps, at LR 2e-2 and
    5e-2 alike); at 0.1, as in a trained model, the logits have the range a preference needs."""
    root = tmp_path_factory.mktemp("lora-ppo")
    test_ppo.write_prompts(root / "prompts")
    init = root / "init"
    run_torchrun(1, ["-m", "megatron_qwen.stages.pretrain", "configs/tiny.yaml", *test_ppo.MODEL, "data.split=100,0,0",
                     f"data.paths=[{root / 'prompts_prompt_document'}]", f"data.cache_dir={root / 'cache'}",
                     "training.train_iters=0", "model.init_method_std=0.1", f"logging.run_dir={init}"])
    return root, init / "checkpoints" / "iter_0000000"


@pytest.fixture(scope="module")
def lora_ppo_at(ppo_start, tmp_path_factory):
    """lora_ppo_at(seed): (run directory, stdout) of PPO_STEPS steps with a LoRA policy on ppo_start's base at
    training.seed=seed, checkpoints every 8; made once per seed."""
    import functools

    @functools.cache
    def make(seed):
        run_dir = tmp_path_factory.mktemp("lora-ppo-run")
        out = run_torchrun(1, test_ppo.ppo_args(ppo_start, run_dir, *LORA, "training.lr=2e-2", "training.min_lr=2e-2",
                                                f"training.train_iters={PPO_STEPS}", "training.save_interval=8",
                                                "training.keep_last=5", *seeded(seed)))
        return run_dir, out.stdout

    return make


@pytest.mark.parallel
def test_ppo_with_a_lora_policy_raises_the_rule_reward(lora_ppo_at, training_seed):
    run_dir, stdout = lora_ppo_at(training_seed)
    assert "the reference model is the policy model with its adapters off" in stdout
    curve = test_ppo.metrics(run_dir)
    assert sorted(curve) == list(range(1, PPO_STEPS + 1))
    first = np.mean([curve[s]["reward_mean"] for s in range(1, 4)])
    last = np.mean([curve[s]["reward_mean"] for s in range(PPO_STEPS - 4, PPO_STEPS + 1)])
    kl = [curve[s]["kl_to_reference"] for s in sorted(curve)]
    print(f"reward {first:.3f} -> {last:.3f}, KL to the reference (adapters off) {kl[0]:.3f} -> {max(kl):.3f}")
    # Chance is 0.25 (tests/ppo_rewards.py); the full-parameter test's rule. Measured 0.27 -> 0.77.
    assert first < 0.35 and last >= 2 * first, (first, last)
    # The first step's policy is its base (B = 0): no KL; then the adapters move it away from the adapters-off
    # reference, which a reference with the adapters on would not show.
    assert kl[0] == 0.0 and max(kl) > 0.01, kl
    assert all(curve[s]["approx_kl"] == 0.0 for s in curve)


# --------------------------------------------------------------------------- adapter-only checkpoints


@pytest.mark.parallel
@pytest.mark.usefixtures("single_rank")
def test_adapter_checkpoint_resumes_at_another_layout_and_refuses_another_base(ppo_start, lora_ppo_at, tmp_path):
    import subprocess
    import sys

    from spawn import cpu_env, free_port

    from megatron_qwen.checkpoint.adapters import base_fingerprint
    from megatron_qwen.checkpoint.io import read_full_state_dict, save_model
    from megatron_qwen.config import load_config
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime

    straight, _ = lora_ppo_at(None)
    ckpt = straight / "checkpoints" / "iter_0000008"
    # The policy's part: its adapters and their optimizer state (the value model is full, under value.).
    saved = read_full_state_dict(ckpt)
    policy = [k for k in saved if not re.search(r"(^|\.)value\.", k)]
    assert policy and all(".adapter." in k for k in policy), [k for k in policy if ".adapter." not in k][:5]
    record = json.loads((ckpt / "adapter_base.json").read_text())
    assert record == {"base": str(ppo_start[1].resolve()), "fingerprint": base_fingerprint(ppo_start[1])}

    load = tmp_path / "from_tp1"
    load.mkdir()
    (load / "latest").write_text("iter_0000008\n")
    (load / "iter_0000008").symlink_to(ckpt)
    # Another base of the same shape (another seed): refused, naming both fingerprints and the key to set.
    other = tmp_path / "other"
    save_model(build_model(load_config("configs/tiny.yaml", [*test_ppo.MODEL, "training.seed=7"]), Runtime.cpu()),
               other)
    args = [a for a in test_ppo.ppo_args(ppo_start, tmp_path / "refused", *LORA, "training.train_iters=10",
                                         f"training.load={load}") if not a.startswith("ppo.policy_from=")]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr",
                           "127.0.0.1", "--master-port", str(free_port()), *args, f"ppo.policy_from={other}"],
                          env=cpu_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode != 0
    assert (f"were trained on the base {ppo_start[1].resolve()} (fingerprint {record['fingerprint'][:16]})"
            in proc.stderr and base_fingerprint(other)[:16] in proc.stderr and "set ppo.policy_from" in proc.stderr), \
        proc.stderr[-3000:]

    # The step-8 adapters continued at TP=2 with SP (the base loaded from adapter_base.json's path, here also
    # ppo.policy_from): the same rollouts, scores and losses as the TP=1 run's steps 9 and 10.
    out = run_torchrun(2, test_ppo.ppo_args(ppo_start, tmp_path / "tp2", *LORA, "training.lr=2e-2",
                                            "training.min_lr=2e-2", "training.train_iters=10",
                                            f"training.load={load}", "parallel.tp=2", "parallel.sp=true"))
    assert "layout changed" in out.stdout and "loaded the base weights of policy" in out.stdout
    ref, got = test_ppo.metrics(straight), test_ppo.metrics(tmp_path / "tp2")
    assert sorted(got) == [9, 10]
    for step in (9, 10):
        for key in ("reward_mean", "response_length", "policy_loss", "value_loss", "kl_to_reference"):
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-4, abs=1e-5), (step, key)


def test_stages_refuse_what_adapters_cannot_do():
    from megatron_qwen.config import ConfigError, load_config
    from megatron_qwen.stages.reward import STAGE as REWARD
    from megatron_qwen.stages.sft import STAGE as SFT
    from megatron_qwen.training.loop import check_stage

    with pytest.raises(ConfigError, match="the reward stage trains a scalar-head model, which takes no adapters"):
        check_stage(load_config("configs/tiny.yaml", [*LORA, "training.init_from=/base"]), REWARD)
    with pytest.raises(ConfigError, match="trains adapters on a frozen base model: set training.init_from"):
        check_stage(load_config("configs/tiny.yaml", LORA), SFT)
    check_stage(load_config("configs/tiny.yaml", [*LORA, "training.init_from=/base"]), SFT)


@pytest.mark.usefixtures("single_rank")
def test_moe_layers_take_adapters_on_their_attention_and_shared_expert_only():
    from megatron_qwen.config import load_config
    from megatron_qwen.model.lora import adapters_disabled, lora_modules
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime

    cfg = load_config("configs/tiny.yaml", [*LORA, "model.num_layers=2", "model.hidden_size=64",
                                            "model.num_attention_heads=4", "model.padded_vocab_size=128",
                                            "model.num_experts=4", "model.moe_ffn_hidden_size=32",
                                            "model.moe_shared_expert_ffn_hidden_size=32"])
    chunk = build_model(cfg, Runtime.cpu(), adapters=True)[0]
    assert sorted({m.linear for m in lora_modules([chunk])}) == ["linear_fc1", "linear_fc2", "linear_proj",
                                                                 "linear_qkv"]
    trained = [n for n, p in chunk.named_parameters() if p.requires_grad]
    assert trained and all(".adapter." in n and (".self_attention." in n or ".mlp.shared_experts." in n)
                           for n in trained), trained
    # Each layer: q, k, v, o and the shared expert's gate, up, down; the routed experts and the router take none.
    assert len(trained) == 2 * 2 * 7, trained
    for module in lora_modules([chunk]):  # nonzero adapters, so that switching them off shows
        for b in module.lora_b.values():
            b.data.normal_(0, 0.05)
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        adapted = chunk(tokens, positions, None)
        with adapters_disabled([chunk]):
            base = chunk(tokens, positions, None)
    assert not torch.allclose(adapted, base)


@pytest.mark.parallel
@pytest.mark.usefixtures("single_rank")
def test_adapters_from_starts_the_adapters_on_their_base_only(ppo_start, lora_ppo_at, tmp_path):
    from types import SimpleNamespace

    from megatron_qwen.checkpoint.io import read_full_state_dict, save_model
    from megatron_qwen.config import load_config
    from megatron_qwen.errors import CheckpointError
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.training.checkpointer import Checkpointer
    from megatron_qwen.training.units import build_unit

    adapters = lora_ppo_at(None)[0] / "checkpoints" / "iter_0000008"
    base = ppo_start[1]
    cfg = load_config("configs/tiny.yaml", [*test_ppo.MODEL, *LORA, f"peft.adapters_from={adapters}"])
    say = []
    checkpointer = Checkpointer(SimpleNamespace(cfg=cfg, say=say.append))
    unit = build_unit(cfg, Runtime.cpu(), "policy")
    checkpointer.init_from(unit, str(base), f"ppo.policy_from={base}")
    save_model(unit.chunks, tmp_path / "started")
    started, stored, base_weights = (read_full_state_dict(p) for p in (tmp_path / "started", adapters, base))
    assert all(torch.equal(started[k], stored[k] if ".adapter." in k else base_weights[k]) for k in started)
    assert any(not torch.equal(stored[k], 0 * stored[k]) for k in started if k.endswith("lora_b"))
    assert "peft.adapters_from" in say[-1]

    other = tmp_path / "other"
    save_model(build_model(load_config("configs/tiny.yaml", [*test_ppo.MODEL, "training.seed=7"]), Runtime.cpu()),
               other)
    with pytest.raises(CheckpointError, match=r"were trained on the base .* set ppo.policy_from to the base"):
        checkpointer.init_from(build_unit(cfg, Runtime.cpu(), "policy"), str(other), f"ppo.policy_from={other}")
