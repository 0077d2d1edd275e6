"""`python -m megatron_qwen.cli COMMAND ...`: the `megatron-qwen` command without its console script (e.g. under
`torchrun -m megatron_qwen.cli generate ...`)."""

from megatron_qwen.cli.main import console

console()
