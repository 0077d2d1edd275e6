"""The `megatron-qwen` command: one entry for everything a user runs.

    megatron-qwen [--verbose] COMMAND [ARGS ...]      (megatron-qwen COMMAND --help for a command's options)

Each command is a module of this package with a `main(argv) -> exit status`; it is imported only when it runs,
so `--help` answers without loading megatron-core. `generate`, `forward`, `long-ppl`, `serve` and `evaluate` take
`--nproc N` to run on N ranks of this machine through torchrun, as `run` does for the training stages.
"""

from __future__ import annotations

import importlib
import sys
import warnings

# name: (module, one line for `megatron-qwen --help`)
COMMANDS = {
    "preprocess": ("megatron_qwen.cli.preprocess", "tokenize corpora, chats, preference pairs or prompts into shards"),
    "convert": ("megatron_qwen.cli.convert", "convert checkpoints between Hugging Face and megatron-core"),
    "generate": ("megatron_qwen.cli.generate", "generate from a checkpoint: prompts, files of prompts or a chat"),
    "forward": ("megatron_qwen.cli.forward", "full-vocabulary logits of token arrays at any parallel layout"),
    "long-ppl": ("megatron_qwen.cli.long_ppl", "perplexity against context length, with and without NTK/LogN/windows"),
    "serve": ("megatron_qwen.cli.serve", "serve a checkpoint over an OpenAI-compatible HTTP API at any layout"),
    "evaluate": ("megatron_qwen.cli.evaluate", "run lm-evaluation-harness tasks on a checkpoint at any layout"),
    "plan": ("megatron_qwen.cli.plan", "rank the parallel layouts that fit a model on a cluster"),
    "plot": ("megatron_qwen.cli.plot", "draw a run's metrics.jsonl into a PNG, per stage"),
    "build-cache": ("megatron_qwen.cli.build_cache", "build the pretraining dataset's index cache ahead of a job"),
    "run": ("megatron_qwen.cli.run", "train a stage (pretrain, sft, reward, ppo, ...) with torchrun on this machine"),
}
# Commands that run on several ranks: `--nproc N` relaunches them under torchrun.
LAUNCHED = ("generate", "forward", "long-ppl", "serve", "evaluate")

# megatron-core's import-time notes that Transformer Engine and Apex are absent (four, and one for Apex alone);
# the start-up line of a run says what it uses instead. Matched by message, category and megatron-core's modules.
ACCELERATOR_NOTES = dict(message=r"(Transformer Engine and Apex are|Apex is) not installed", category=UserWarning,
                         module=r"megatron\.core\.")
# torch's deprecation of ShardedTensor, which megatron-core's checkpoints still hold, from torch's checkpoint
# planners at every load (default_planner, planner_helpers).
SHARDED_TENSOR_NOTES = dict(message="Please use DTensor instead and we are deprecating ShardedTensor",
                            category=FutureWarning, module=r"torch\.distributed\.checkpoint\.")


def show_library_warnings(verbose: bool) -> None:
    """Hide the libraries' notes above unless `verbose` (then they show, also in spite of the package's own filter)."""
    for notes in (ACCELERATOR_NOTES, SHARDED_TENSOR_NOTES):
        warnings.filterwarnings("default" if verbose else "ignore", **notes)


def usage() -> str:
    """`megatron-qwen --help`: the commands, one line each."""
    width = max(map(len, COMMANDS))
    lines = ["usage: megatron-qwen [--verbose] COMMAND [ARGS ...]", "", __doc__.split("\n\n")[0], "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_module, summary) in COMMANDS.items()]
    lines += ["", "options:", f"  {'-h, --help':<{width}}  show this help and exit",
              f"  {'--verbose':<{width}}  also show the libraries' warnings (megatron-core, torch)",
              "", "`megatron-qwen COMMAND --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run `megatron-qwen ARGV`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = False
    # The global options come before the command; everything after it is the command's to parse.
    while argv and argv[0].startswith("-"):
        flag = argv.pop(0)
        if flag in ("-h", "--help"):
            print(usage())
            return 0
        if flag != "--verbose":
            print(f"megatron-qwen: unknown option {flag}; the options are --verbose and --help", file=sys.stderr)
            return 2
        verbose = True
    if not argv or argv[0] not in COMMANDS:
        given = f"no command {argv[0]!r}" if argv else "a command is needed"
        print(f"{usage()}\n\nmegatron-qwen: {given}; the commands are {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    command, args = argv[0], argv[1:]
    show_library_warnings(verbose)
    if command in LAUNCHED and "--nproc" in args:
        from megatron_qwen.cli.run import launch_command

        return launch_command(command, args, verbose)
    module = importlib.import_module(COMMANDS[command][0])
    if command == "run":
        return module.main(args, verbose=verbose)
    try:
        return module.main(args)
    finally:
        _close_process_group()


def _close_process_group() -> None:
    # generate and forward leave the process group up so that a caller can run them again; a command exits.
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def console() -> None:
    """The console script's entry point."""
    sys.exit(main())
