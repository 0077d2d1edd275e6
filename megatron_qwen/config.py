"""Run configuration: one typed dataclass tree, loaded from YAML, overridden with dotted keys.

    python -m megatron_qwen.config configs/qwen-7b.yaml parallel.tp=4 --world-size 16

prints the resolved configuration, or every problem found (exit 2). Validation runs before any
process group exists and each message names the value, the rule and the fix.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from megatron_qwen.errors import ConfigError

TOKENIZER_VOCAB_SIZE = 151851  # regular + special tokens of qwen.tiktoken
# Tokenizer families (model.family): v1's 151,643 BPE ranks plus each release's special/added tokens.
TOKENIZER_FAMILIES = ("qwen", "qwen1.5", "qwen2", "qwen2.5", "qwen3")
TOKENIZER_VOCAB_SIZES = {"qwen": 151851, "qwen1.5": 151646, "qwen2": 151646, "qwen2.5": 151665, "qwen3": 151669}
DEVICE_ENV = "MEGATRON_QWEN_DEVICE"  # when set, the default of parallel.device (tests force CPU ranks with it)


@dataclass
class ModelConfig:
    """Shape and numerics of a Qwen network (v1, 1.5, 2, 2.5, 3 dense); configs/ holds the released sizes."""

    name: str = "custom"
    num_layers: int = 2
    hidden_size: int = 256
    num_attention_heads: int = 2
    # Grouped-query attention: key/value heads, each shared by num_attention_heads / num_query_groups query heads
    # (Qwen2, 2.5, 3). None: one per query head (multi-head attention, Qwen v1 and most Qwen1.5 sizes).
    num_query_groups: Optional[int] = None
    # Width of one attention head. None: hidden_size / num_attention_heads; Qwen3 sets it apart (0.6B: 16 heads of
    # 128 at hidden 1024).
    kv_channels: Optional[int] = None
    qkv_bias: bool = True  # bias on the query/key/value projections (v1 to 2.5); Qwen3 has none
    qk_layernorm: bool = False  # Qwen3: RMSNorm over head_dim on every query and key head, before RoPE
    # The output layer is the input embedding (the small Qwen2.5 and Qwen3 sizes); with PP > 1 the first and last
    # stages each hold it and sum its gradient.
    tie_word_embeddings: bool = False
    ffn_hidden_size: int = 512  # per-branch SwiGLU width (the v1 config's intermediate_size / 2)
    padded_vocab_size: int = 151936  # embedding rows; kept when TP divides it, else padded up
    # Tokenizer family: special tokens, chat template and SFT loss mask (qwen: v1).
    family: Literal["qwen", "qwen1.5", "qwen2", "qwen2.5", "qwen3"] = "qwen"
    seq_length: int = 2048  # training context; NTK/LogN start beyond it
    max_position_embeddings: int = 8192
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-6
    init_method_std: float = 0.02
    use_dynamic_ntk: bool = False  # inference only, beyond seq_length
    use_logn_attn: bool = False  # inference only, beyond seq_length
    # Layer-wise window attention (Qwen report, section 2.3.2), inference only: one window per layer, in layer order;
    # a query then sees its last `window` positions (itself included); 0 or null: full causal attention. [] : none.
    attention_windows: list = field(default_factory=list)
    # RoPE scaling of a Hugging Face config's rope_scaling (Qwen2.5's 128K recipe): YaRN with this factor over
    # rope_original_max_position_embeddings. Applies to every forward, as in transformers: set it for
    # long-context inference (or long-context training), not for short-context fine-tuning.
    rope_scaling: Optional[Literal["yarn"]] = None
    rope_scaling_factor: float = 1.0
    rope_original_max_position_embeddings: Optional[int] = None
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"  # auto: TE when it imports on GPU
    # FP8 GEMMs in the layers' linears (e4m3 activations and weights, e5m2 gradients) with this scaling recipe;
    # delayed is Transformer Engine's only. Embedding, output layer, attention and norms stay high precision.
    fp8: Optional[Literal["tensorwise", "rowwise", "delayed"]] = None
    # auto: Transformer Engine when it imports on GPU and has the recipe, else torchao in the local spec
    fp8_backend: Literal["auto", "te", "torchao"] = "auto"
    # Mixture of experts (Qwen1.5-MoE / Qwen2-MoE, Qwen3-MoE); None: every layer dense. Names follow
    # megatron-core; the Hugging Face key is in each comment.
    num_experts: Optional[int] = None  # routed experts per MoE layer (num_experts)
    moe_router_topk: int = 2  # experts per token (num_experts_per_tok)
    moe_ffn_hidden_size: Optional[int] = None  # one routed expert's SwiGLU width (moe_intermediate_size)
    moe_norm_topk_prob: bool = False  # renormalise the top-k routing weights to sum to 1 (norm_topk_prob)
    # Qwen2-MoE's shared expert: an MLP of this width beside the routed ones (shared_expert_intermediate_size);
    # None: no shared expert (Qwen3-MoE). With moe_shared_expert_gate its output is scaled by sigmoid(gate(x)).
    moe_shared_expert_ffn_hidden_size: Optional[int] = None
    moe_shared_expert_gate: bool = False
    # Which layers are MoE (decoder_sparse_step, mlp_only_layers): layer i (0-based) is a dense MLP of
    # ffn_hidden_size when i is in moe_mlp_only_layers or (i + 1) % moe_decoder_sparse_step != 0.
    moe_decoder_sparse_step: int = 1
    moe_mlp_only_layers: list = field(default_factory=list)
    moe_aux_loss_coeff: float = 0.001  # load-balancing loss coefficient (router_aux_loss_coef)
    moe_z_loss_coeff: Optional[float] = None  # router z-loss; None: off
    # Tokens one expert takes, as a multiple of its even share (extra tokens are dropped); None: dropless.
    moe_capacity_factor: Optional[float] = None

    @property
    def is_moe(self) -> bool:
        """Whether any layer routes tokens to experts."""
        return self.num_experts is not None

    @property
    def moe_layers(self) -> list[bool]:
        """Per layer (0-based): True where the MLP is a mixture of experts, as transformers' Qwen2-MoE decides."""
        if not self.is_moe:
            return [False] * self.num_layers
        step = max(self.moe_decoder_sparse_step, 1)
        return [i not in self.moe_mlp_only_layers and (i + 1) % step == 0 for i in range(self.num_layers)]

    @property
    def head_dim(self) -> int:
        """Width of one attention head (`kv_channels`, else hidden_size / num_attention_heads)."""
        return self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads (`num_query_groups`, else one per query head)."""
        return self.num_query_groups if self.num_query_groups is not None else self.num_attention_heads


@dataclass
class ParallelConfig:
    """How ranks are laid out; data parallelism takes what TP x PP leaves of the world size."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1  # model chunks per pipeline rank (interleaved 1F1B when > 1)
    sp: bool = False  # sequence parallelism over the TP group
    cp: int = 1  # context parallelism: each sequence split over this many ranks (two mirrored chunks per rank)
    # How Transformer Engine's attention exchanges keys and values across the CP group (its `cp_comm_type`); the
    # local layers always all-gather them.
    cp_comm_type: Literal["p2p", "all_gather", "a2a"] = "p2p"
    ep: int = 1  # expert parallelism (MoE): the routed experts split over this many ranks
    etp: Optional[int] = None  # tensor parallelism inside each expert; None: parallel.tp (megatron-core's default)
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = True  # reduce gradients bucket by bucket while backward still runs
    overlap_param_gather: bool = True  # distributed optimizer: gather updated weights during the next forward
    ddp_bucket_size: Optional[int] = None  # elements per gradient bucket when overlapping (None: max(4e7, 1e6 x DP))
    # auto: CUDA when available; cpu: gloo ranks (the CPU harness). $MEGATRON_QWEN_DEVICE, when set, is the default.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    timeout_minutes: float = 10.0  # every collective of a training step; a dead rank ends the job instead of hanging
    # Waits of all ranks outside the step, which may follow long work of one rank: start-up, dataset index
    # building (rank 0 first), checkpoint saves and loads.
    io_timeout_minutes: float = 120.0


@dataclass
class TrainingConfig:
    """Optimisation recipe (the Qwen report's pretraining defaults) and run length."""

    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_iters: int = 100
    lr: float = 3e-4
    min_lr: float = 3e-5  # cosine decay ends at 10 % of the peak
    lr_warmup_iters: int = 2000
    lr_decay_iters: Optional[int] = None  # defaults to train_iters
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    recompute: Literal["none", "selective", "full"] = "none"  # selective: core attention only
    recompute_num_layers: int = 1
    eval_interval: int = 0  # validate every K steps on the valid split (0: never)
    eval_iters: int = 1  # global batches per validation
    save: Optional[str] = None  # checkpoint directory (None: run_dir/checkpoints)
    save_interval: int = 0  # save every K steps (0: only at the end)
    keep_last: int = 3  # checkpoints kept; older ones are deleted after a newer one is current
    load: Optional[str] = None  # resume from the latest checkpoint here (default: the save directory)
    # Start from these weights (a checkpoint dir), fresh optimizer and step. A scalar-head model (reward) may
    # start from a language model: its output layer is left out and the head starts fresh.
    init_from: Optional[str] = None
    # Unpickle everything in the checkpoints this job loads (load, init_from). Off: only the types this
    # project's checkpoints hold are unpickled, and any other is refused by name, since unpickling can run
    # code. Turn it on only for a checkpoint from a source you trust.
    trust_checkpoint: bool = False
    max_skipped_in_row: int = 5  # non-finite losses/grad norms skipped in a row before aborting
    # GPUs: keep a stage's frozen models (DPO's reference; PPO's reference and reward model) in pinned host memory
    # between their forwards (frees their device memory, at one host-to-device copy each per use); off: resident
    offload_frozen: bool = True


@dataclass
class DataConfig:
    """Where tokens come from."""

    paths: list = field(default_factory=list)  # [weight, prefix, weight, prefix, ...] of .bin/.idx shards
    split: str = "969,30,1"
    tokenizer_file: Optional[str] = None  # default: qwen.tiktoken from the dashscope wheel
    cache_dir: Optional[str] = None  # sample-index cache (default: a cache/ folder beside the shards)
    allow_repeat: bool = False  # allow more samples than the train split holds (epochs > 1)


@dataclass
class SFTConfig:
    """Supervised fine-tuning (stages/sft.py)."""

    pack: bool = True  # several conversations per sequence (block-diagonal attention), else one each
    epochs: Optional[float] = None  # when set, training.train_iters covers this many passes over the train split


@dataclass
class RewardConfig:
    """The reward model (stages/reward.py); it starts from a language model with training.init_from."""

    epochs: Optional[float] = None  # when set, training.train_iters covers this many passes over the pairs


@dataclass
class DPOConfig:
    """Direct preference optimisation (stages/dpo.py): Rafailov et al.'s loss against a frozen reference."""

    beta: float = 0.1  # strength of the implicit KL constraint (the reward is beta x the log-ratio to the reference)
    label_smoothing: float = 0.0  # cDPO: the probability that a pair's preference label is flipped (sigmoid only)
    loss: Literal["sigmoid", "ipo"] = "sigmoid"  # sigmoid: Rafailov et al.; ipo: Azar et al.'s squared loss
    reference_from: Optional[str] = None  # the frozen reference's checkpoint (default: training.init_from)
    epochs: Optional[float] = None  # when set, training.train_iters covers this many passes over the pairs


@dataclass
class PPOConfig:
    """PPO (stages/ppo.py), the Qwen report's RLHF recipe by default (with the stage's `STAGE_DEFAULTS`)."""

    policy_from: Optional[str] = None  # the SFT checkpoint the policy (and by default the reference) starts from
    reference_from: Optional[str] = None  # default: policy_from
    reward_from: Optional[str] = None  # a reward-model checkpoint (stages/reward.py), read at the final <|im_end|>
    # or package.module:function(prompt_tokens, response_tokens, prompt, response) -> float
    reward_fn: Optional[str] = None
    value_from: Optional[str] = None  # default: reward_from (or, with reward_fn only, policy_from with a fresh head)
    value_lr: float = 5e-6  # the value model's peak learning rate (the policy's is training.lr)
    estimator: Literal["gae", "grpo"] = "gae"  # grpo: group-relative advantages, no value model
    prompts_per_step: int = 64  # prompts per step over all data-parallel ranks
    samples_per_prompt: int = 2  # responses sampled per prompt
    max_new_tokens: int = 512
    # ids that end a response (default: <|im_end|>, <|im_start|>, <|endoftext|>)
    stop_ids: list = field(default_factory=list)
    temperature: float = 1.0
    top_p: float = 0.9
    kl_coef: float = 0.04  # per-token KL penalty against the reference, in the reward
    kl_estimator: Literal["k1", "k3"] = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    clip_ratio: float = 0.2  # policy-ratio clip
    value_clip: float = 0.15  # value-loss clip
    epochs: int = 1  # passes over each step's rollouts
    minibatches: int = 1  # optimizer steps per pass
    critic_warmup_steps: int = 50  # steps in which only the value model is trained
    reward_norm: bool = True  # normalise scores by the running mean and std of all scores so far
    unfinished: Literal["score", "penalty", "drop"] = "score"  # responses cut by max_new_tokens
    unfinished_penalty: float = -1.0  # their score with unfinished=penalty
    ptx_data: list = field(default_factory=list)  # pretraining shards ([weight, prefix, ...] or [prefix, ...])
    ptx_coef: float = 0.0  # weight of the pretraining LM loss in the policy's step
    ptx_microbatches: int = 1  # pretraining micro-batches per policy optimizer step and data-parallel rank


@dataclass
class FaultConfig:
    """Fault injection, to test the failure paths (never set in a real run)."""

    nan_loss_at: list = field(default_factory=list)  # steps (1-based) whose loss is made NaN: the skip path
    kill_during_save_at: Optional[int] = None  # SIGKILL once this step's checkpoint is written, before it is current


@dataclass
class WandbConfig:
    project: Optional[str] = None  # None disables W&B
    entity: Optional[str] = None
    name: Optional[str] = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online with WANDB_API_KEY, else offline


@dataclass
class LoggingConfig:
    log_interval: int = 10
    run_dir: str = "runs/default"  # metrics.jsonl, config.yaml, default checkpoint directory
    peak_tflops: Optional[float] = None  # per-device peak for MFU (default: looked up by GPU name)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class EvaluationConfig:
    """lm-evaluation-harness tasks run during training, on the training layout, after a checkpoint is saved."""

    tasks: list = field(default_factory=list)  # lm-eval task names (empty: none)
    interval: int = 0  # every K steps, each after a save (0: only at the end of training)
    limit: Optional[float] = None  # documents per task (whole number) or a fraction (< 1); None: all
    num_fewshot: Optional[int] = None  # None: each task's own
    include_path: list = field(default_factory=list)  # folders of task YAML files (local datasets)
    batch_size: int = 8  # rows scored or generated together


# The projections a low-rank adapter can target: the Hugging Face names, and the megatron-core linear each is part of.
LORA_PROJECTIONS = {"q_proj": "linear_qkv", "k_proj": "linear_qkv", "v_proj": "linear_qkv", "o_proj": "linear_proj",
                    "gate_proj": "linear_fc1", "up_proj": "linear_fc1", "down_proj": "linear_fc2"}


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning: low-rank adapters on the layers' linears, the base weights frozen."""

    method: Optional[Literal["lora"]] = None  # None: every parameter is trained
    rank: int = 16  # r: the adapters' inner width
    alpha: float = 32.0  # the adapter's output is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input
    # Hugging Face projection names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) or
    # megatron-core linears (linear_qkv = q/k/v, linear_proj = o, linear_fc1 = gate/up, linear_fc2 = down).
    target: list = field(default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
    # An adapter checkpoint (or a converted `peft` adapter) whose adapters training starts from; the base weights
    # come from training.init_from (ppo.policy_from).
    adapters_from: Optional[str] = None

    def projections(self) -> list[str]:
        """The targeted Hugging Face projections, in LORA_PROJECTIONS order (the config's names expanded)."""
        wanted = set()
        for name in self.target:
            wanted |= {hf for hf, linear in LORA_PROJECTIONS.items() if name in (hf, linear)}
        return [hf for hf in LORA_PROJECTIONS if hf in wanted]


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ParallelLayout:
    """The resolved rank layout: every size the rest of the code needs, computed once."""

    world_size: int
    tp: int
    pp: int
    vpp: int
    dp: int
    sp: bool
    cp: int = 1
    ep: int = 1
    etp: int = 1

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one replica of the dense weights: TP x PP x CP (CP ranks hold the same weights but
        split every sequence, so DP is what TP x PP x CP leaves of the world)."""
        return self.tp * self.pp * self.cp

    @property
    def expert_dp(self) -> int:
        """Data-parallel replicas of each expert: what ETP x EP x PP leaves of the world."""
        return self.world_size // (self.etp * self.ep * self.pp)


# --------------------------------------------------------------------------- loading


def _field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def choices(cls, name: str) -> tuple:
    """The values a `Literal` field of config section `cls` may take (its type is the one list of them)."""
    typ = _field_types(cls)[name]
    if typing.get_origin(typ) is typing.Union:
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
    return typing.get_args(typ)


# Values that are no longer accepted: the message names the choice that replaces them.
RETIRED_VALUES = {
    "model.fp8": {
        "hybrid": "model.fp8 now names the scaling recipe and every recipe uses the hybrid format (e4m3 forward, "
                  "e5m2 gradients): use delayed (Transformer Engine's delayed scaling, what hybrid meant) or "
                  "tensorwise / rowwise (current scaling, with Transformer Engine or torchao)",
        "e4m3": "e4m3 everywhere (gradients too) is not offered: model.fp8 names the scaling recipe, with e4m3 "
                "forward and e5m2 gradients; use tensorwise, rowwise or delayed",
    },
}


def _coerce(value, typ, where: str):
    """Check/convert a YAML value to the dataclass field type; raise ConfigError naming the key."""
    origin = typing.get_origin(typ)
    if origin is typing.Union:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin is Literal:
        # The field's type is the one list of its choices: checked here, shown in the message.
        choices = typing.get_args(typ)
        retired = RETIRED_VALUES.get(where, {})
        if isinstance(value, str) and value in retired:
            raise ConfigError([f"{where}={value!r} is no longer accepted: {retired[value]}"])
        if value not in choices or isinstance(value, bool):
            raise ConfigError([f"{where}={value!r} must be one of {', '.join(map(str, choices))}"])
        return value
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError([f"{where}: expected a mapping, got {value!r}"])
        return _build(typ, value, where)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError([f"{where}={value!r}: expected true or false"])
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError([f"{where}={value!r}: expected an integer"])
        return int(value)
    if typ is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the number it plainly is.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError([f"{where}={value!r}: expected a number"])
        return float(value)
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError([f"{where}={value!r}: expected a string"])
        return str(value)
    if typ is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError([f"{where}={value!r}: expected a list"])
        return list(value)
    return value


# Keys that moved: an old config names the new place instead of failing as an unknown key.
MOVED_KEYS = {
    "data.pack": "sft.pack",
    "data.epochs": "sft.epochs (SFT) or reward.epochs (reward model)",
    "training.inject_nan_at": "faults.nan_loss_at",
    "reward.init_from_lm": "training.init_from (a reward model started from a language model leaves out its output "
                           "layer and starts the head fresh)",
    "ppo.offload_frozen": "training.offload_frozen (one key for every stage's frozen models)",
}


def _build(cls, data: dict, where: str = ""):
    """`cls` from a mapping; every problem of every nested section is collected into one ConfigError."""
    types = _field_types(cls)
    prefix = f"{where}." if where else ""
    problems = [
        f"'{prefix}{k}' has moved to {MOVED_KEYS[prefix + k]}" if prefix + k in MOVED_KEYS
        else f"unknown key '{prefix}{k}'; valid keys under {where or 'the top level'}: {', '.join(sorted(types))}"
        for k in sorted(set(data) - set(types))
    ]
    kwargs = {}
    for name, typ in types.items():
        if name in data:
            try:
                kwargs[name] = _coerce(data[name], typ, prefix + name)
            except ConfigError as exc:
                problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return cls(**kwargs)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# A stage's own recipe where it differs from the dataclass defaults (pretraining's): the defaults of a run of that
# stage, whichever config file it starts from. A file's ``base:`` chain (model sizes, which carry pretraining's
# recipe) is below them, the file given and the overrides above (`load_config`). configs/stage/*.yaml restate them.
STAGE_DEFAULTS: dict[str, dict] = {
    # The Qwen report's RLHF stage: policy LR 1e-6 and value LR 5e-6 (ppo.value_lr), both constant; no dropout, so
    # that the old log-probabilities and the first update see one network; one log line and a checkpoint per 50 steps.
    "ppo": {
        "model": {"hidden_dropout": 0.0, "attention_dropout": 0.0},
        "training": {"train_iters": 1000, "lr": 1.0e-6, "min_lr": 1.0e-6, "lr_warmup_iters": 0,
                     "lr_decay_style": "constant", "weight_decay": 0.0, "save_interval": 50},
        "data": {"split": "100,0,0"},
        "logging": {"log_interval": 1, "run_dir": "runs/ppo"},
    },
}


def _read_yaml(path: Path, seen: tuple) -> tuple[dict, str | None]:
    """A YAML config's own mapping and its ``base:`` (None when it has none)."""
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} does not exist"])
    if path.resolve() in seen:
        raise ConfigError([f"config {path} includes itself through 'base:'"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML ({exc})"]) from exc
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections (model, parallel, ...)"])
    return data, data.pop("base", None)


def _base_tree(path: Path, base: str | None, seen: tuple) -> dict:
    return {} if base is None else load_yaml_tree(path.parent / base, seen + (path.resolve(),))


def load_yaml_tree(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a YAML config, following its optional ``base:`` (a path relative to the file) first."""
    path = Path(path)
    data, base = _read_yaml(path, _seen)
    return _deep_merge(_base_tree(path, base, _seen), data)


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides; values are parsed as YAML (``parallel.sp=true``)."""
    tree = _deep_merge({}, tree)
    for item in overrides:
        if "=" not in item:
            raise ConfigError([f"override {item!r} is not of the form section.key=value (e.g. parallel.tp=2)"])
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError([f"override {item!r}: {key!r} is not a section"])
        node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, stage: str | None = None) -> Config:
    """Build a `Config` from a YAML file (or the defaults) plus dotted overrides; types are checked.

    Each key takes the first of: the overrides, the file `path` itself, `stage`'s `STAGE_DEFAULTS`, the files
    of its ``base:`` chain, the dataclass defaults. The stage's recipe beats what a file inherits (model sizes carry
    pretraining's) and yields to what the user's own file or command line says.

    ``$MEGATRON_QWEN_DEVICE``, when set, is the default of ``parallel.device``: the file and the overrides
    still win. It lets a test suite put every rank on the CPU on a machine that has a GPU.
    """
    tree = copy.deepcopy(STAGE_DEFAULTS.get(stage, {}))  # the overrides below write into the tree
    if path is not None:
        path = Path(path)
        data, base = _read_yaml(path, ())
        tree = _deep_merge(_deep_merge(_base_tree(path, base, ()), tree), data)
    device = os.environ.get(DEVICE_ENV)
    if device:
        allowed = choices(ParallelConfig, "device")
        if device not in allowed:
            raise ConfigError([f"{DEVICE_ENV}={device!r} (the default of parallel.device) must be one of "
                               f"{', '.join(allowed)}"])
        if "device" not in (tree.get("parallel") or {}):
            tree = _deep_merge(tree, {"parallel": {"device": device}})
    tree = apply_overrides(tree, overrides or [])
    return _build(Config, tree)


def load_model_section(path: str | Path) -> ModelConfig:
    """The ``model`` section of a YAML config alone (a checkpoint's model_config.yaml: its other sections may
    come from an older version of this config tree)."""
    return _build(ModelConfig, load_yaml_tree(path).get("model") or {}, "model")


# --------------------------------------------------------------------------- validation


def padded_vocab_size(size: int, tp: int) -> int:
    """The embedding rows used at tensor-parallel size `tp`: `size` if TP divides it, else the next multiple."""
    return size if size % tp == 0 else int(math.ceil(size / tp) * tp)


def validate(cfg: Config, world_size: int | None = None) -> tuple[list[str], list[str]]:
    """Check `cfg` (for `world_size` ranks when given). Returns (errors, notes)."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    errors: list[str] = []
    notes: list[str] = []

    for section, name, value in (
        ("model", "num_layers", m.num_layers),
        ("model", "hidden_size", m.hidden_size),
        ("model", "num_attention_heads", m.num_attention_heads),
        ("model", "ffn_hidden_size", m.ffn_hidden_size),
        ("model", "seq_length", m.seq_length),
        ("model", "num_query_groups", m.kv_heads),
        ("model", "kv_channels", m.head_dim if m.kv_channels is not None else 1),
        ("parallel", "tp", p.tp),
        ("parallel", "pp", p.pp),
        ("parallel", "vpp", p.vpp),
        ("parallel", "cp", p.cp),
        ("parallel", "ep", p.ep),
        ("parallel", "etp", 1 if p.etp is None else p.etp),
        ("parallel", "ddp_bucket_size", 1 if p.ddp_bucket_size is None else p.ddp_bucket_size),
        ("training", "micro_batch_size", t.micro_batch_size),
        ("training", "global_batch_size", t.global_batch_size),
    ):
        if value < 1:
            errors.append(f"{section}.{name}={value} must be >= 1")
    for name in ("timeout_minutes", "io_timeout_minutes"):
        if getattr(p, name) <= 0:
            errors.append(f"parallel.{name}={getattr(p, name)} must be > 0 (minutes)")
    if errors:
        return errors, notes

    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        errors.append(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}; "
            "set model.kv_channels (the head width, 128 in every released size) or change the heads"
        )
    if m.num_attention_heads % m.kv_heads:
        errors.append(
            f"model.num_query_groups={m.kv_heads} does not divide model.num_attention_heads={m.num_attention_heads}; "
            f"every key/value head serves the same number of query heads: choose from "
            f"{_divisors(m.num_attention_heads)}"
        )
    if m.rope_scaling == "yarn" and (m.rope_scaling_factor <= 1 or not m.rope_original_max_position_embeddings):
        errors.append(
            f"model.rope_scaling=yarn needs model.rope_scaling_factor > 1 (got {m.rope_scaling_factor}) and "
            f"model.rope_original_max_position_embeddings (got {m.rope_original_max_position_embeddings}), "
            "as a Hugging Face config's rope_scaling gives them (Qwen2.5: factor 4.0 over 32768)"
        )
    if m.rope_scaling is not None and m.use_dynamic_ntk:
        errors.append("model.rope_scaling and model.use_dynamic_ntk both rescale RoPE; keep one of them")
    family_vocab = TOKENIZER_VOCAB_SIZES[m.family]
    if m.padded_vocab_size < family_vocab and m.name.startswith("qwen"):
        errors.append(
            f"model.padded_vocab_size={m.padded_vocab_size} is smaller than the {m.family} tokenizer's {family_vocab} "
            "tokens (model.family); use 151936 or 152064, as the released checkpoints do"
        )
    if m.max_position_embeddings < m.seq_length:
        errors.append(
            f"model.seq_length={m.seq_length} exceeds model.max_position_embeddings={m.max_position_embeddings}; "
            "raise max_position_embeddings or shorten seq_length"
        )
    errors += _fp8_problems(cfg)

    if m.num_attention_heads % p.tp:
        errors.append(
            f"parallel.tp={p.tp} does not divide model.num_attention_heads={m.num_attention_heads}; "
            f"choose tp from {_divisors(m.num_attention_heads)}"
        )
    if m.kv_heads % p.tp and not m.num_attention_heads % p.tp:
        errors.append(
            f"parallel.tp={p.tp} does not divide model.num_query_groups={m.kv_heads} (key/value heads): each "
            f"tensor-parallel rank holds whole key/value heads; choose tp from {_divisors(m.kv_heads)}"
        )
    if m.ffn_hidden_size % p.tp:
        errors.append(
            f"parallel.tp={p.tp} does not divide model.ffn_hidden_size={m.ffn_hidden_size}; "
            f"choose tp from {_divisors(m.ffn_hidden_size)}"
        )
    vocab = padded_vocab_size(m.padded_vocab_size, p.tp)
    if vocab != m.padded_vocab_size:
        notes.append(
            f"model.padded_vocab_size={m.padded_vocab_size} is not divisible by parallel.tp={p.tp}; "
            f"padded up to {vocab} (the extra rows are zero and never predicted)"
        )
    if m.num_layers % (p.pp * p.vpp):
        errors.append(
            f"parallel.pp={p.pp} x parallel.vpp={p.vpp} = {p.pp * p.vpp} does not divide "
            f"model.num_layers={m.num_layers}; choose pp*vpp from {_divisors(m.num_layers)}"
        )
    if p.vpp > 1 and p.pp < 2:
        errors.append(f"parallel.vpp={p.vpp} needs pipeline parallelism: set parallel.pp >= 2 or vpp=1")
    if p.sp and p.tp < 2:
        errors.append("parallel.sp=true needs tensor parallelism: set parallel.tp >= 2 or parallel.sp=false")
    if p.cp > 1 and m.seq_length % (2 * p.cp):
        errors.append(
            f"model.seq_length={m.seq_length} is not divisible by 2 x parallel.cp = {2 * p.cp}: context parallelism "
            "gives each rank two mirrored chunks of every sequence; choose a seq_length that is a multiple of "
            f"{2 * p.cp} or another cp"
        )
    elif p.cp > 1 and p.sp and (m.seq_length // p.cp) % p.tp:
        errors.append(
            f"sequence parallelism splits each context-parallel rank's {m.seq_length // p.cp} tokens over "
            f"parallel.tp={p.tp}; choose a seq_length that is a multiple of {p.cp * p.tp}"
        )
    cp_errors, cp_notes = _cp_comm_problems(cfg)
    errors += cp_errors
    notes += cp_notes
    errors += _moe_problems(cfg)
    errors += _window_problems(m)
    errors += _evaluation_problems(cfg)
    errors += _peft_problems(cfg.peft)

    if world_size is not None:
        mp = p.tp * p.pp * p.cp
        expert_mp = (p.tp if p.etp is None else p.etp) * p.ep * p.pp
        if world_size % mp:
            errors.append(
                f"world size {world_size} is not a multiple of parallel.tp x parallel.pp x parallel.cp = {mp}; "
                f"launch a multiple of {mp} ranks or change tp/pp/cp"
            )
        elif world_size % expert_mp:
            errors.append(
                f"world size {world_size} is not a multiple of parallel.etp x parallel.ep x parallel.pp = "
                f"{expert_mp}; launch a multiple of {expert_mp} ranks or change etp/ep/pp"
            )
        else:
            dp = world_size // mp
            if t.global_batch_size % (t.micro_batch_size * dp):
                errors.append(
                    f"training.global_batch_size={t.global_batch_size} is not a multiple of "
                    f"micro_batch_size={t.micro_batch_size} x data-parallel size {dp}; "
                    f"use a multiple of {t.micro_batch_size * dp}"
                )
            elif p.pp > 1 and p.vpp > 1 and (t.global_batch_size // (t.micro_batch_size * dp)) % p.pp:
                errors.append(
                    f"interleaved pipelining needs the number of micro-batches "
                    f"({t.global_batch_size // (t.micro_batch_size * dp)}) to be a multiple of parallel.pp={p.pp}; "
                    "change global_batch_size or micro_batch_size"
                )
    return errors, notes


def _cp_comm_problems(cfg: Config) -> tuple[list[str], list[str]]:
    """parallel.cp_comm_type: what Transformer Engine's attention needs for it, and where it does not apply."""
    m, p = cfg.model, cfg.parallel
    if p.cp == 1:
        return [], []
    errors, notes = [], []
    heads, kv = m.num_attention_heads // p.tp, m.kv_heads // p.tp
    if p.cp_comm_type == "a2a" and (heads % p.cp or kv % p.cp):
        errors.append(f"parallel.cp_comm_type=a2a scatters each tensor-parallel rank's attention heads ({heads} "
                      f"query, {kv} key/value) over parallel.cp={p.cp} ranks and needs both divisible by it; use "
                      "parallel.cp_comm_type=p2p or all_gather, or a cp that divides them")
    if p.cp_comm_type != "p2p" or p.device == "cpu":
        notes.append(f"parallel.cp_comm_type={p.cp_comm_type} is how Transformer Engine's attention exchanges keys "
                     "and values (the TE spec on GPUs, for models without model.use_logn_attn or "
                     "model.attention_windows); elsewhere (the local spec, CPU ranks) every layer all-gathers them")
    return errors, notes


def _window_problems(m: ModelConfig) -> list[str]:
    """model.attention_windows problems: one window per layer, each a whole number >= 0 or null."""
    windows = m.attention_windows
    if not windows:
        return []
    if len(windows) != m.num_layers:
        return [f"model.attention_windows has {len(windows)} entries for model.num_layers={m.num_layers}; give one "
                "window per layer (0 or null: full attention), or [] for none"]
    bad = [(i, w) for i, w in enumerate(windows)
           if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0)]
    if bad:
        return [f"model.attention_windows[{i}]={w!r} is not a window: use a whole number of positions >= 1, "
                f"or 0 / null for full attention" for i, w in bad]
    return []
def _peft_problems(peft: PeftConfig) -> list[str]:
    """peft.* problems: the adapter's rank, scale, dropout and target names."""
    if peft.method is None:
        return []
    errors = []
    if peft.rank < 1:
        errors.append(f"peft.rank={peft.rank} must be >= 1 (the adapters' inner width; 8-64 is usual)")
    if peft.alpha <= 0:
        errors.append(f"peft.alpha={peft.alpha} must be > 0 (the adapter's output is scaled by alpha / rank)")
    if not 0 <= peft.dropout < 1:
        errors.append(f"peft.dropout={peft.dropout} must be in [0, 1)")
    known = sorted(set(LORA_PROJECTIONS) | set(LORA_PROJECTIONS.values()))
    unknown = [name for name in peft.target if name not in known]
    if unknown:
        errors.append(f"peft.target has {', '.join(map(repr, unknown))}: adapters go on {', '.join(known)}")
    elif not peft.target:
        errors.append(f"peft.target is empty: name the projections to adapt from {', '.join(known)}")
    return errors


def _evaluation_problems(cfg: Config) -> list[str]:
    """evaluation.* values out of range."""
    e = cfg.evaluation
    errors = []
    if not all(isinstance(t, str) and t for t in e.tasks):
        errors.append(f"evaluation.tasks={e.tasks!r} must be a list of lm-eval task names")
    if e.interval < 0:
        errors.append(f"evaluation.interval={e.interval} must be >= 0 (0: only at the end of training)")
    if e.limit is not None and (e.limit <= 0 or e.limit >= 1 and e.limit != int(e.limit)):
        errors.append(f"evaluation.limit={e.limit} must be a whole number of documents or a fraction in (0, 1)")
    if e.batch_size < 1:
        errors.append(f"evaluation.batch_size={e.batch_size} must be >= 1")
    if e.tasks and cfg.parallel.cp > 1:
        errors.append("evaluation.tasks run at parallel.cp=1 only; evaluate the saved checkpoint with "
                      "`megatron-qwen evaluate` instead")
    return errors


def _moe_problems(cfg: Config) -> list[str]:
    """Mixture-of-experts shape and expert-parallel layout problems."""
    m, p = cfg.model, cfg.parallel
    etp = p.tp if p.etp is None else p.etp
    if not m.is_moe:
        if p.ep > 1 or (p.etp is not None and p.etp != p.tp):
            return [f"parallel.ep={p.ep} / parallel.etp={p.etp} split experts, and this model has none "
                    "(model.num_experts is unset); leave ep=1 and etp unset"]
        return []
    errors = []
    if m.num_experts < 1 or not 1 <= m.moe_router_topk <= m.num_experts:
        errors.append(f"model.moe_router_topk={m.moe_router_topk} must be between 1 and "
                      f"model.num_experts={m.num_experts}")
    if m.moe_ffn_hidden_size is None or m.moe_ffn_hidden_size < 1:
        errors.append("model.moe_ffn_hidden_size (one expert's width, Hugging Face moe_intermediate_size) must be set "
                      "for a model with model.num_experts")
    elif m.moe_ffn_hidden_size % etp:
        errors.append(f"parallel.etp={etp} does not divide model.moe_ffn_hidden_size={m.moe_ffn_hidden_size}; "
                      f"choose etp from {_divisors(m.moe_ffn_hidden_size)}")
    if m.num_experts >= 1 and m.num_experts % p.ep:
        errors.append(f"parallel.ep={p.ep} does not divide model.num_experts={m.num_experts}; "
                      f"choose ep from {_divisors(m.num_experts)}")
    if m.moe_shared_expert_gate and m.moe_shared_expert_ffn_hidden_size is None:
        errors.append("model.moe_shared_expert_gate=true needs a shared expert: set "
                      "model.moe_shared_expert_ffn_hidden_size")
    if m.moe_decoder_sparse_step < 1:
        errors.append(f"model.moe_decoder_sparse_step={m.moe_decoder_sparse_step} must be >= 1")
    outside = [i for i in m.moe_mlp_only_layers if not isinstance(i, int) or not 0 <= i < m.num_layers]
    if outside:
        errors.append(f"model.moe_mlp_only_layers has {outside}: layers are numbered 0 to {m.num_layers - 1}")
    elif not any(m.moe_layers):
        errors.append("model.num_experts is set but no layer is MoE (moe_decoder_sparse_step / moe_mlp_only_layers); "
                      "unset num_experts for a dense model")
    if m.moe_capacity_factor is not None and m.moe_capacity_factor <= 0:
        errors.append(f"model.moe_capacity_factor={m.moe_capacity_factor} must be > 0, or unset for dropless routing")
    return errors


def fp8_gemm_dims(cfg: Config) -> list[tuple[str, str, int]]:
    """Every matrix dimension an FP8 GEMM of a layer sees on one rank: (where, what, size).

    The linears' input and output features at this TP size (expert TP for the routed experts), and the tokens of a
    micro-batch, which the weight-gradient GEMM contracts over (under SP the GEMMs see the whole gathered
    sequence). A routed expert's token count is the router's choice: its linears pad it (`model.fp8`).
    """
    m, tp = cfg.model, cfg.parallel.tp
    h, f = m.hidden_size, m.ffn_hidden_size
    rank = "" if tp == 1 else f" / parallel.tp={tp}"
    q, kv = m.num_attention_heads * m.head_dim, m.kv_heads * m.head_dim
    dims = [
        ("self_attention.linear_qkv", f"input features (model.hidden_size={h})", h),
        ("self_attention.linear_qkv", f"output features per rank (query width {q} + 2 x key/value width {kv}{rank})",
         (q + 2 * kv) // tp),
        ("self_attention.linear_proj", f"input features per rank (query width {q}{rank})", q // tp),
        ("self_attention.linear_proj", f"output features (model.hidden_size={h})", h),
    ]

    def mlp(where: str, key: str, width: int, split: int, note: str) -> list[tuple[str, str, int]]:
        """An MLP's fc1 output and fc2 input dimensions (its linears named `where` + linear_fc1 ...): `width` (config
        key `key`) split over `split` ranks."""
        return [(f"{where}linear_fc1", f"output features per rank (2 x {key}={width}{note})", 2 * width // split),
                (f"{where}linear_fc2", f"input features per rank ({key}={width}{note})", width // split)]

    if not m.is_moe or not all(m.moe_layers):
        dims += mlp("mlp.", "model.ffn_hidden_size", f, tp, rank)
    if m.is_moe and m.moe_ffn_hidden_size is not None:
        etp = tp if cfg.parallel.etp is None else cfg.parallel.etp
        erank = "" if etp == 1 else f" / expert tensor parallelism {etp}"
        dims += mlp("mlp.experts ", "model.moe_ffn_hidden_size", m.moe_ffn_hidden_size, etp, erank)
        if m.moe_shared_expert_ffn_hidden_size is not None:
            dims += mlp("mlp.shared_experts ", "model.moe_shared_expert_ffn_hidden_size",
                        m.moe_shared_expert_ffn_hidden_size, tp, rank)
    dims.append(("every layer linear", f"tokens per micro-batch (model.seq_length={m.seq_length} x "
                 f"training.micro_batch_size={cfg.training.micro_batch_size})",
                 m.seq_length * cfg.training.micro_batch_size))
    return dims


def _fp8_problems(cfg: Config) -> list[str]:
    """What stops `model.fp8` from running: a backend that cannot run the recipe, or a GEMM dimension that
    FP8 matrix multiplication (torch._scaled_mm, Transformer Engine) cannot take."""
    m, p = cfg.model, cfg.parallel
    problems = []
    if m.fp8_backend == "te" and m.transformer_impl == "local":
        problems.append("model.fp8_backend=te needs the Transformer Engine layers but model.transformer_impl=local; "
                        "set model.transformer_impl=auto or model.fp8_backend=torchao")
    if m.fp8_backend == "torchao" and m.transformer_impl == "transformer_engine":
        problems.append("model.fp8_backend=torchao runs in the local layers but "
                        "model.transformer_impl=transformer_engine; set model.transformer_impl=auto or "
                        "model.fp8_backend=te")
    if m.fp8 is None:
        return problems
    if m.fp8 == "delayed" and (m.fp8_backend == "torchao" or m.transformer_impl == "local"):
        problems.append("model.fp8=delayed is Transformer Engine's recipe (scales from an amax history), which the "
                        "local layers do not run; use model.fp8=tensorwise or rowwise, or Transformer Engine "
                        "(model.fp8_backend=te, model.transformer_impl=auto)")
    if m.fp8 == "rowwise" and (m.fp8_backend == "te" or m.transformer_impl == "transformer_engine"):
        problems.append("model.fp8=rowwise runs on torchao in the local layers; Transformer Engine's recipes here are "
                        "tensorwise and delayed: set model.fp8_backend=auto or torchao (and "
                        "model.transformer_impl=auto), or model.fp8=tensorwise")
    if m.hidden_size % p.tp or m.ffn_hidden_size % p.tp or m.kv_heads % p.tp:
        return problems  # reported above as a layout problem
    for where, what, size in fp8_gemm_dims(cfg):
        if size % 16:
            problems.append(
                f"model.fp8={m.fp8}: FP8 GEMMs need every matrix dimension to be a multiple of 16, but {where} has "
                f"{size} {what}; change the sizes so that this is a multiple of 16, or set model.fp8=null"
            )
    return problems


def resolve(cfg: Config, world_size: int) -> tuple[Config, ParallelLayout, list[str]]:
    """Validate for `world_size` ranks and return the config to run (vocabulary padded for TP),
    its `ParallelLayout` and the notes. Raises ConfigError with every problem found."""
    errors, notes = validate(cfg, world_size)
    if errors:
        raise ConfigError(errors)
    p = cfg.parallel
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, padded_vocab_size=padded_vocab_size(cfg.model.padded_vocab_size, p.tp))
    )
    layout = ParallelLayout(world_size=world_size, tp=p.tp, pp=p.pp, vpp=p.vpp, dp=world_size // (p.tp * p.pp * p.cp),
                            sp=p.sp, cp=p.cp, ep=p.ep, etp=p.tp if p.etp is None else p.etp)
    return cfg, layout, notes


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_qwen.config", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2")
    parser.add_argument("--world-size", type=int, default=None, help="check the layout for this many ranks")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.world_size is not None:
            cfg, layout, notes = resolve(cfg, args.world_size)
        else:
            errors, notes = validate(cfg)
            if errors:
                raise ConfigError(errors)
            layout = None
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    out = cfg.to_dict()
    if layout is not None:
        out["resolved_layout"] = dataclasses.asdict(layout)
    print(yaml.safe_dump(out, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
