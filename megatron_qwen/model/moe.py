"""The Qwen MoE router: megatron-core's TopKRouter with the auxiliary losses weighted the same at every layout.

With calculate_per_token_loss (the project's loss: summed per token, divided once by the global token count),
megatron-core 0.16.1 scales each rank's load-balancing and z-loss by the tokens that rank routed
(`TopKRouter.attach_and_log_load_balancing_loss`, `TopKRouter.apply_z_loss`). Under sequence parallelism a
tensor-parallel rank routes 1/tp of the sequence while the language-model loss it is divided with counts the
whole sequence, so both auxiliary losses pulled the weights 1/tp as hard as at TP=1 (measured: TP=2 with SP
drifted from TP=1 from the first step). Here each rank's share is scaled by the tokens of the whole sequence.
"""

from __future__ import annotations

from megatron.core.transformer.moe.router import TopKRouter


class QwenTopKRouter(TopKRouter):
    """TopKRouter whose auxiliary losses keep their TP=1 weight under sequence parallelism."""

    def _sequence_ranks(self) -> int:
        return self.tp_group.size() if self.config.sequence_parallel else 1

    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
                                           reduce_group_has_dp=False, valid_token_count=None):
        tokens = activation.shape[0] if valid_token_count is None else valid_token_count
        return super().attach_and_log_load_balancing_loss(
            activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group, reduce_group_has_dp,
            valid_token_count=tokens * self._sequence_ranks())

    def apply_z_loss(self, logits, padding_mask=None):
        coeff = self.config.moe_z_loss_coeff
        if coeff is None or self._sequence_ranks() == 1:
            return super().apply_z_loss(logits, padding_mask)
        self.config.moe_z_loss_coeff = coeff * self._sequence_ranks()
        try:
            return super().apply_z_loss(logits, padding_mask)
        finally:
            self.config.moe_z_loss_coeff = coeff
