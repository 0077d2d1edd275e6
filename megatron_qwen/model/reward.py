"""Models of the chat stages: the Qwen GPTModel with RoPE read at each token's position id (SFT on packed
conversations), and the reward model, whose last pipeline stage outputs a scalar per token instead of logits.

Both are the chunks `qwen.build_model` returns (Qwen spec, rotary, layout unchanged), narrowed to a
subclass that overrides one step of GPTModel's forward (`_preprocess` / `_postprocess`), the way
torch.nn.utils.parametrize swaps a module's class. The reward model drops the LM output layer and gets
`RewardHead`, transformers' Qwen2ForSequenceClassification ``score``: Linear(hidden, 1) without bias.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from megatron_qwen.config import Config, ConfigError
from megatron_qwen.model.qwen import build_model

HEAD_KEY = "reward_head.weight"  # the head's global key in checkpoints


class QwenChatModel(GPTModel):
    """GPTModel whose rotary embedding is taken at `position_ids`, so conversations packed into one row
    each start at position 0 (megatron-core's GPTModel rotates by row index and ignores them)."""

    def _preprocess(self, input_ids, position_ids, **kwargs):
        out = super()._preprocess(input_ids=input_ids, position_ids=position_ids, **kwargs)
        rotary = out[1]
        if position_ids is None or rotary is None or kwargs.get("inference_context") is not None:
            return out
        # Angles [S, 1, 1, d] of positions 0..S-1 -> [s, b, 1, d], each token's own position.
        per_token = rotary[:, 0, 0][position_ids.t()].unsqueeze(2)
        return (out[0], per_token, *out[2:])


class RewardHead(torch.nn.Module):
    """Linear(hidden, 1, bias=False) over the final hidden states: a reward for every token.

    The weight is replicated on every tensor-parallel rank, initialised from `seed` so that every layout
    starts alike. Under sequence parallelism each rank scores its own tokens, the rewards are gathered,
    and the weight's gradient is summed over the TP group (the `sequence_parallel` attribute asks
    megatron-core's finalize_model_grads for that, as for the norms).
    """

    def __init__(self, config, seed: int):
        super().__init__()
        weight = torch.empty(1, config.hidden_size, dtype=torch.float32)
        torch.nn.init.normal_(weight, std=config.init_method_std, generator=torch.Generator().manual_seed(seed))
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(weight.to(device=device, dtype=config.params_dtype))
        self.sequence_parallel = config.sequence_parallel
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[s (/tp), b, h] hidden states -> [b, s] fp32 rewards (the full sequence on every TP rank)."""
        rewards = (hidden_states.float() @ self.weight.float().t()).squeeze(-1)
        if self.sequence_parallel:
            # Every TP rank computes the same loss from the gathered rewards, so backward only splits.
            rewards = gather_from_sequence_parallel_region(rewards, tensor_parallel_output_grad=False)
        return rewards.t()


class QwenRewardModel(QwenChatModel):
    """The Qwen network with `RewardHead` in place of the LM output layer on the last pipeline stage.

    The last stage returns rewards [b, s] for every token; the loss reads them at each sequence's final
    ``<|im_end|>``. Other stages return hidden states, as GPTModel does.
    """

    def _postprocess(self, hidden_states, **kwargs):
        if not self.post_process:
            return hidden_states
        return self.reward_head(hidden_states)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        # GPTModel's version post-processes the LM output layer's entries, which this model does not have.
        return MegatronModule.sharded_state_dict(self, prefix, sharded_offsets, ensure_metadata_has_dp_cp_group(metadata))


def build_chat_model(cfg: Config, on_cpu: bool) -> list[QwenChatModel]:
    """This rank's chunks of the Qwen language model, taking RoPE at each token's position id (SFT)."""
    chunks = build_model(cfg, on_cpu)
    for chunk in chunks:
        chunk.__class__ = QwenChatModel
    return chunks


def build_reward_model(cfg: Config, on_cpu: bool) -> list[QwenRewardModel]:
    """This rank's chunks of the reward model; the head starts from ``training.seed``.

    With ``reward.init_from_lm`` (and nothing to resume), every weight but the head is loaded from that
    language-model checkpoint. Needs megatron-core's parallel state.
    """
    chunks = build_model(cfg, on_cpu)
    for chunk in chunks:
        chunk.__class__ = QwenRewardModel
        if chunk.post_process:
            del chunk.output_layer
            chunk.reward_head = RewardHead(chunk.config, cfg.training.seed)
    lm = cfg.reward.init_from_lm
    if lm is not None:
        if cfg.training.init_from is not None:
            raise ConfigError([
                f"reward.init_from_lm={lm!r} and training.init_from={cfg.training.init_from!r} both choose the starting "
                "weights; use reward.init_from_lm for a language model, training.init_from for a reward checkpoint"
            ])
        if not _resuming(cfg):
            load_language_model(chunks, lm)
            if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
                print(f"initialised the reward model from language model {lm} (reward head from training.seed)", flush=True)
    return chunks


def _resuming(cfg: Config) -> bool:
    from megatron_qwen.training.checkpointing import latest_checkpoint

    # The loop resumes from here when it holds a checkpoint (the same rule as training.load / training.save).
    t = cfg.training
    return latest_checkpoint(t.load or t.save or Path(cfg.logging.run_dir) / "checkpoints") is not None


def load_language_model(chunks: list[QwenRewardModel], path: str) -> None:
    """Load every weight of a language-model checkpoint (any layout) except its output layer into reward
    model chunks, whose heads keep their initialisation. All ranks call this."""
    path = Path(path)
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"reward.init_from_lm={str(path)!r} is not a dist_checkpointing checkpoint (no metadata.json); check the path")
    state = {}
    for i, chunk in enumerate(chunks):
        sharded = {k: v for k, v in chunk.sharded_state_dict().items() if not k.startswith("reward_head.")}
        state["model" if len(chunks) == 1 else f"model{i}"] = sharded
    loaded = dist_checkpointing.load(state, str(path))
    for i, chunk in enumerate(chunks):
        missing, unexpected = chunk.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"], strict=False)
        if unexpected or any(not key.startswith("reward_head.") for key in missing):
            raise ConfigError([
                f"reward.init_from_lm={str(path)!r}: its weights do not fit this model (missing {missing}, unexpected "
                f"{unexpected}); the model.* sizes must be those of the language model"
            ])
