"""`evaluation.tasks` during training: lm-eval on the trained model, on the training layout, after a save.

`after_save_hook(cfg)` is what the language-model stages (pretrain, SFT, DPO) hand to the trainer. At each
step `evaluation.interval` names (and the last), after that step's checkpoint, it runs the tasks with `QwenLM`
on the model chunks in memory: every data-parallel replica runs them (the same answers), the gradient buffers
are untouched, the model goes back to training mode after. The metrics (``eval/TASK/METRIC``) are logged with
the step and the whole results written to ``RUN_DIR/eval/step_N.json``.
"""

from __future__ import annotations

import json

import torch

from megatron_qwen.config import Config
from megatron_qwen.evaluation import harness
from megatron_qwen.inference.forward import ForwardPlan


def after_save_hook(cfg: Config):
    """The trainer's `after_save` for `cfg.evaluation` (None when it names no task). Unknown tasks are refused
    here, before any model is built."""
    e = cfg.evaluation
    if not e.tasks:
        return None
    manager = harness.task_manager(list(e.include_path))
    harness.check_tasks(manager, list(e.tasks))
    limit = int(e.limit) if e.limit is not None and e.limit >= 1 else e.limit

    def run(trainer) -> dict:
        from megatron_qwen.config import TOKENIZER_VOCAB_SIZES
        from megatron_qwen.evaluation.lm import QwenLM

        ctx = trainer.ctx
        chunks = [getattr(chunk, "module", chunk) for chunk in trainer.model]
        for wrapped in trainer.model:
            # The distributed optimizer gathers updated weights during the next forward; gather them now.
            if hasattr(wrapped, "start_param_sync") and trainer.cfg.parallel.use_distributed_optimizer:
                wrapped.start_param_sync(force_sync=True)
        vocab = trainer.cfg.model.padded_vocab_size
        plan = ForwardPlan(trainer.cfg, ctx.layout, vocab, min(vocab, TOKENIZER_VOCAB_SIZES[trainer.cfg.model.family]))
        # The engine rotates each token at its position id (the same angles as by row index).
        saved = [chunk.rope_at_positions for chunk in chunks]
        try:
            for chunk in chunks:
                chunk.rope_at_positions = True
                chunk.eval()
            lm = QwenLM(chunks, plan, trainer.tokenizer, batch_size=e.batch_size)
            results = harness.run_tasks(lm, list(e.tasks), manager, e.num_fewshot, limit)
        finally:
            for chunk, flag in zip(chunks, saved):
                chunk.rope_at_positions = flag
                chunk.train()
        if results is None:  # lm-eval aggregates on each node's first process only (LOCAL_RANK 0)
            return {}
        if torch.distributed.get_rank() == 0:
            out = ctx.run_dir / "eval"
            out.mkdir(parents=True, exist_ok=True)
            summary = harness.summary(results)
            (out / f"step_{trainer.state.step}.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        return harness.flat_metrics(results)

    return run
