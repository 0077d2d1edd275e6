"""The layout planner: for a model, a cluster and a batch, the parallel layouts that fit and how fast they run.

`memory` says what each rank allocates (weights, fp32 main gradients, optimizer state, activations),
`steptime` how long a step takes (compute, memory-bound kernels, TP/CP/EP/PP/DP communication, pipeline
bubble, optimizer step), `hardware` which
GPUs exist (`gpus.yaml`), and `search` enumerates the layouts the trainer's own config validation
accepts and ranks those that fit. `tools/plan.py` is the command line.
"""


class PlanError(ValueError):
    """A request the planner cannot answer (unknown GPU, impossible world size, model too big), with the
    nearest thing that would work in the message."""
