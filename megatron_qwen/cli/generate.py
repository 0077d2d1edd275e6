"""Generate from a checkpoint at any layout with the KV-cache engine: prompts in, continuations out.

    megatron-qwen generate [--nproc N] --ckpt CKPT \\
        (--prompt TEXT | --prompts FILE.jsonl | --prompt-tokens FILE.npy | --interactive) \\
        [--chat [--system TEXT]] [--max-new-tokens 128] [--temperature 1.0] [--top-p 1.0] [--top-k 0] \\
        [--seed 0] [--tp T --pp P --vpp V --ep E] [--precision auto|fp32|bf16] [--batch-size 8] [--out OUT.jsonl] \
        [--trust-checkpoint]

Prompts: --prompt is one text; --prompts a JSONL file of {"prompt": "..."} lines (with --chat also
{"messages": [...]} lines ending with a user turn, and an optional "system"); --prompt-tokens a
(batch, len) integer array of token ids padded with -1 on the right. With --chat, text prompts are
rendered with the chat template of the checkpoint's family (model.family) up to
"<|im_start|>assistant\\n" (--system replaces the family's default system prompt). Generation stops at
<|im_end|>, <|im_start|> or <|endoftext|>, or after --max-new-tokens, and draws only ids the family's
tokenizer has (the padded embedding rows after them are never sampled).

--out writes one JSON line per prompt: prompt_tokens, tokens (the continuation), logprobs (of each new
token under the model), text (decoded when the vocabulary holds the family's tokens, else null) and finished (stopped at
a stop token). With one prompt and no --out the continuation streams to stdout. --interactive is a ChatML
chat in the terminal that keeps the conversation (/reset starts over, /exit or end of input leaves).
`torchrun --nproc-per-node N tools/generate.py ...` is the same, and it runs under srun and mpirun too.
Exit status 2: the request was refused, e.g. a checkpoint holding pickled objects outside the allowlist
(--trust-checkpoint unpickles them: only for a checkpoint from a source you trust).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_qwen.cli.loading import add_loading_options, warn_if_trusted
from megatron_qwen.data.chat import ChatFormatError, render_prompt
from megatron_qwen.errors import UserError
from megatron_qwen.inference import forward as inference
from megatron_qwen.inference.engine import GenerationEngine
from megatron_qwen.inference.sampling import SamplingParams
from megatron_qwen.platform.launch import detect_launch, init_distributed, refuse
from megatron_qwen.platform.runtime import resolve_runtime
from megatron_qwen.tokenizer import load_tokenizer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron-qwen generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, type=Path, help="megatron-core checkpoint directory (any layout)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt text")
    source.add_argument("--prompts", type=Path,
                        help='JSONL file of {"prompt": ...} (or, with --chat, {"messages": [...]}) lines')
    source.add_argument("--prompt-tokens", type=Path, help=".npy (batch, len) token ids, padded with -1 on the right")
    source.add_argument("--interactive", action="store_true", help="a ChatML chat in the terminal")
    parser.add_argument("--chat", action="store_true", help="render text prompts with ChatML up to the assistant turn")
    parser.add_argument("--system", default=None,
                        help="system prompt for --chat (default: the model family's, e.g. Qwen3: none)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely ids (default 0: off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    parser.add_argument("--out", type=Path, default=None, help="write one JSON line per prompt here")
    add_loading_options(parser, ep=True)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size} must be >= 1")
    if args.system is not None and not (args.chat or args.interactive):
        parser.error("--system applies to ChatML prompts: add --chat")
    if args.interactive and args.out is not None:
        parser.error("--interactive prints the conversation; drop --out")
    return args


def read_prompts(args: argparse.Namespace, tokenizer, vocab_limit: int) -> list[list[int]]:
    """The prompts as token ids; UserError names the line or row and the problem."""
    if args.prompt_tokens is not None:
        return _prompt_token_rows(args.prompt_tokens, vocab_limit)
    if vocab_limit < tokenizer.n_vocab:
        raise UserError(
            f"this model's vocabulary has {vocab_limit} ids, fewer than the {tokenizer.family} tokenizer's "
            f"{tokenizer.n_vocab}: text prompts cannot be encoded for it; give token ids with --prompt-tokens"
        )
    if args.prompt is not None:
        record = {"prompt": args.prompt}
        return [_encode(record, args, tokenizer, "--prompt")]
    path = args.prompts
    if not path.is_file():
        raise UserError(f"--prompts {path} does not exist")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object with 'prompt' or 'messages'")
        prompts.append(_encode(record, args, tokenizer, f"{path}:{number}"))
    if not prompts:
        raise UserError(f"--prompts {path} holds no prompt")
    return prompts


def _encode(record: dict, args: argparse.Namespace, tokenizer, where: str) -> list[int]:
    if args.chat:
        if args.system is not None and "system" not in record:
            record = dict(record, system=args.system)
        try:
            return render_prompt(tokenizer, record)
        except ChatFormatError as exc:
            raise UserError(f"{where}: {exc}") from None
    if "messages" in record:
        raise UserError(f"{where}: 'messages' are rendered with ChatML: add --chat")
    if not isinstance(record.get("prompt"), str):
        raise UserError(f"{where}: expected a string 'prompt'")
    if not record["prompt"]:
        raise UserError(f"{where}: the prompt is empty")
    return tokenizer.encode(record["prompt"])


def _prompt_token_rows(path: Path, vocab_limit: int) -> list[list[int]]:
    rows = []
    for i, row in enumerate(inference.read_token_array(path, "--prompt-tokens").tolist()):
        length = row.index(-1) if -1 in row else len(row)
        if any(t != -1 for t in row[length:]):
            raise UserError(
                f"--prompt-tokens {path}: row {i} has ids after its -1 padding; pad with -1 on the right only"
            )
        rows.append(row[:length])
    return rows


class Writer:
    """Rank 0 of the last stage: decodes, streams and writes the results."""

    def __init__(self, tokenizer, decodable: bool, stream: bool):
        self.tokenizer, self.decodable, self.stream = tokenizer, decodable, stream
        self.streamed: list[int] = []
        self.printed = ""

    def decode(self, ids: list[int], stop: tuple[int, ...]) -> str | None:
        if not self.decodable:
            return None
        return self.tokenizer.decode([t for t in ids if t not in stop])

    def on_token(self, row: int, token: int, stop: tuple[int, ...]) -> None:
        """Print the new text of the one streamed prompt (held back while a character is incomplete)."""
        if token in stop:
            return
        self.streamed.append(token)
        text = self.tokenizer.decode(self.streamed)
        if not text.endswith("\ufffd"):
            print(text[len(self.printed):], end="", flush=True)
            self.printed = text


def chat_loop(engine: GenerationEngine, params: SamplingParams, tokenizer, system: str | None, writer: bool) -> None:
    """Read user turns on rank 0, generate on every rank, print the replies; the history is kept."""
    history: list[dict] = []
    if writer:
        print("chat: type a message; /reset starts over, /exit (or end of input) leaves", flush=True)
    while True:
        line = [None]
        if torch.distributed.get_rank() == 0:
            try:
                line[0] = input("user> ")
            except EOFError:
                line[0] = "/exit"
        torch.distributed.broadcast_object_list(line, src=0)
        text = line[0].strip()
        if text == "/exit":
            break
        if text == "/reset" or not text:
            history = [] if text == "/reset" else history
            continue
        history.append({"role": "user", "content": text})
        prompt = render_prompt(tokenizer, {"messages": history, **({"system": system} if system else {})})
        try:
            engine.check([prompt], params)
        except UserError as exc:
            if writer:
                print(f"error: {exc}; /reset to start a new conversation", flush=True)
            history.pop()
            continue
        streamer = Writer(tokenizer, True, True)
        if writer:
            print("assistant> ", end="", flush=True)
        result = engine.generate([prompt], params,
                                 on_token=(lambda r, t: streamer.on_token(r, t, params.stop_ids)) if writer else None)
        if writer:
            print(flush=True)
        history.append({"role": "assistant",
                        "content": tokenizer.decode([t for t in result.tokens[0] if t not in params.stop_ids])})


def main(argv: list[str] | None = None) -> int:
    """Run one generation request on this process's rank; returns the exit status."""
    args = parse_args(argv)
    launch = detect_launch()
    warn_if_trusted(args, launch.rank)
    try:
        plan = inference.prepare(args.ckpt, launch.world_size, tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep,
                                 precision=args.precision,
                                 config_path=args.config, trust_checkpoint=args.trust_checkpoint)
        tokenizer = load_tokenizer(family=plan.cfg.model.family)
        vocab_limit = plan.generate_vocab  # the family's ids: never the embedding's padding rows
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, stop_ids=tokenizer.generation_stop_ids(vocab_limit))
        params.check()
        prompts = [] if args.interactive else read_prompts(args, tokenizer, vocab_limit)
        if args.interactive and vocab_limit < tokenizer.n_vocab:
            raise UserError(f"--interactive needs the {tokenizer.family} tokenizer's {tokenizer.n_vocab} ids; "
                            f"this model has {vocab_limit}")
        if not args.interactive:
            GenerationEngine.check_request(prompts, params, vocab_limit, plan.cfg.model.max_position_embeddings)
        runtime = resolve_runtime(plan.cfg, launch.local_rank)
    except UserError as exc:
        return refuse(launch, str(exc))

    cfg = plan.cfg
    init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp, device=cfg.parallel.device,
                     ep=cfg.parallel.ep,
                     timeout_minutes=cfg.parallel.timeout_minutes, seed=cfg.training.seed)
    try:
        engine = GenerationEngine(inference.load_chunks(plan, args.ckpt, runtime), vocab_limit)
        is_writer = inference.is_writer()
        if args.interactive:
            chat_loop(engine, params, tokenizer, args.system, is_writer)
            return 0
        writer = Writer(tokenizer, vocab_limit >= tokenizer.n_vocab, stream=len(prompts) == 1 and args.out is None)
        stream = ((lambda row, token: writer.on_token(row, token, params.stop_ids))
                  if is_writer and writer.stream else None)
        lines, tokens, seconds = [], 0, 0.0
        for start in range(0, len(prompts), args.batch_size):
            result = engine.generate(prompts[start:start + args.batch_size], params, on_token=stream)
            tokens, seconds = tokens + result.new_tokens, seconds + result.seconds
            for i, new in enumerate(result.tokens):
                lines.append({"prompt_tokens": result.prompt_tokens[i], "tokens": new, "logprobs": result.logprobs[i],
                              "text": writer.decode(new, params.stop_ids), "finished": result.finished[i]})
        if is_writer:
            if writer.stream:
                print(flush=True)
            elif args.out is None:
                for line in lines:
                    print(json.dumps(line), flush=True)
            if args.out is not None:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                tmp = args.out.with_name(args.out.name + ".tmp")
                tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
                os.replace(tmp, args.out)
                print(f"wrote {args.out}: {len(lines)} continuation(s)", file=sys.stderr)
            print(f"{tokens} tokens in {seconds:.1f} s ({tokens / max(seconds, 1e-9):.1f} tokens/s)", file=sys.stderr)
        torch.distributed.barrier()
    finally:
        parallel_state.destroy_model_parallel()
    return 0

