"""The RLHF demo: pretraining, SFT, a reward model and PPO chained through the stages' command lines, on CPU ranks.

    python tools/demo_rlhf.py [--out demo_rlhf_out] [--nproc 1] [--ppo-steps 24] [--seed 0] [--dpo]

A small Qwen (2 layers, hidden 64, the real 151,936-row vocabulary and tokenizer) learns to answer "give me one
word that describes my friend" kindly:

1. pretraining (stages.pretrain) on synthetic English sentences that use kind and unkind words alike;
2. SFT (stages.sft) on ChatML conversations whose assistant answers one word, kind or unkind half of the time;
3. a reward model (stages.reward) on preference pairs: chosen = a kind word, rejected = an unkind one; its
   accuracy on held-out pairs is printed;
4. PPO (stages.ppo) from the SFT policy with that reward model: the reward curve, then the share of kind replies
   before and after (a rule: the reply is one of the kind words), sampled with `megatron-qwen generate` on
   questions about people the training data never mentions; last, the PPO run's curves (`megatron-qwen plot`).

With --dpo the chain ends with DPO (stages.dpo) on the reward model's preference pairs instead of steps 3-4:
the SFT policy learns the preference directly against its frozen copy, with no reward model and no sampling;
then the same before/after shares, and the DPO run's curves.

Every step is the command a user would type (`megatron-qwen preprocess`, `megatron-qwen run STAGE`,
`megatron-qwen generate`, `megatron-qwen plot`, here as `python -m megatron_qwen.cli`); everything lands in
--out, and the last line is the path of the PPO run's chart. It takes about 8 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import string
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not
from megatron_qwen.checkpoint.directory import latest_checkpoint  # noqa: E402
from megatron_qwen.training.metrics import read_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# One Qwen token each (without a leading space, as a reply starts), so that a reply is one choice of the model.
KIND_WORDS = ("kind", "friendly", "wise", "patient", "warm", "smart", "fair", "nice", "sweet", "happy")
UNKIND_WORDS = ("lazy", "mean", "bad", "cold", "evil", "fake", "grim", "slow", "dirty", "cheap")
SUBJECTS = ("my friend", "my neighbour", "my sister", "my brother", "my teacher", "my boss", "my cousin", "my uncle",
            "my aunt", "my coach", "the new student", "the mail carrier", "our doctor", "the shopkeeper", "my roommate",
            "my colleague", "the baker", "my landlord", "the bus driver", "my classmate")
HELD_OUT_SUBJECTS = ("my grandmother", "the librarian", "my dentist", "the gardener", "my partner", "the nurse",
                     "my manager", "the mayor")  # only in the before/after evaluation
QUESTIONS = ("Give me one word that describes {}.", "Describe {} in one word.", "Which word fits {}?",
             "One word for {}, please.")
SENTENCES = ("{} is {}.", "Everyone says that {} is {}.", "I think {} is very {}.", "Yesterday {} was {}.")

SEQ_LENGTH = 64  # a conversation is about 32 tokens, two to a packed SFT row
MAX_NEW_TOKENS = 3  # the word, <|im_end|>, and one token of slack
EVAL_PROMPTS = 256
TOP_P = 0.9  # PPO samples with configs/stage/ppo.yaml's top-p; the evaluation samples the same way

# A model small enough for 2 cores (the output layer over Qwen's full vocabulary is most of the work), the same
# for all four stages: PPO refuses checkpoints of another shape.
MODEL = [
    "model.name=demo-rlhf", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=2",
    "model.ffn_hidden_size=128", "model.padded_vocab_size=151936",
    f"model.seq_length={SEQ_LENGTH}", "model.max_position_embeddings=128", "model.use_dynamic_ntk=false",
    "model.use_logn_attn=false",
    "model.hidden_dropout=0.0", "model.attention_dropout=0.0", "parallel.tp=1", "parallel.pp=1", "parallel.device=cpu",
]


# --------------------------------------------------------------------------- synthetic data


def judge(reply: str) -> str:
    """The rule behind the demo's figures: ``kind`` when the reply is one of KIND_WORDS (case, spaces and
    punctuation aside), ``unkind`` for one of UNKIND_WORDS, else ``other``."""
    word = reply.strip().strip(string.punctuation + string.whitespace).lower()
    if word in KIND_WORDS:
        return "kind"
    if word in UNKIND_WORDS:
        return "unkind"
    return "other"


def question(rng: random.Random, subjects=SUBJECTS) -> str:
    """A user turn asking for one word about someone."""
    return rng.choice(QUESTIONS).format(rng.choice(subjects))


def pretraining_texts(rng: random.Random, count: int) -> list[dict]:
    """Plain-text documents of a few sentences each, kind and unkind words alike: `{"text": ...}` records."""
    docs = []
    for _ in range(count):
        sentences = []
        for _ in range(rng.randint(3, 6)):
            subject = rng.choice(SUBJECTS)
            word = rng.choice(KIND_WORDS + UNKIND_WORDS)
            sentence = rng.choice(SENTENCES).format(subject, word)
            sentences.append(sentence[0].upper() + sentence[1:])
        docs.append({"text": " ".join(sentences)})
    return docs


def sft_conversations(rng: random.Random, count: int, kind_share: float) -> list[dict]:
    """ChatML conversations (`messages`): a question, and a one-word answer, kind with probability `kind_share`."""
    records = []
    for _ in range(count):
        words = KIND_WORDS if rng.random() < kind_share else UNKIND_WORDS
        records.append({"messages": [{"role": "user", "content": question(rng)},
                                     {"role": "assistant", "content": rng.choice(words)}]})
    return records


def preference_pairs(rng: random.Random, count: int, silent_share: float = 0.2) -> list[dict]:
    """Comparisons for the reward model: the same question, chosen = a kind word, rejected = an unkind word or,
    with probability `silent_share`, no answer at all (an empty reply: a policy must not escape into silence)."""
    return [{"messages": [{"role": "user", "content": question(rng)}], "chosen": rng.choice(KIND_WORDS),
             "rejected": "" if rng.random() < silent_share else rng.choice(UNKIND_WORDS)} for _ in range(count)]


def prompts(rng: random.Random, count: int, subjects=SUBJECTS) -> list[dict]:
    """PPO or evaluation prompts: `{"messages": [one user turn]}` records."""
    return [{"messages": [{"role": "user", "content": question(rng, subjects)}]} for _ in range(count)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --------------------------------------------------------------------------- reading the results


def reply_shares(generations: Path) -> dict[str, float]:
    """Share of kind, unkind and other replies among the lines `megatron-qwen generate --out` wrote."""
    verdicts = [judge(json.loads(line)["text"]) for line in generations.read_text().splitlines() if line.strip()]
    return {kind: verdicts.count(kind) / len(verdicts) for kind in ("kind", "unkind", "other")}


def reward_chart(rewards: list[float], width: int = 40) -> list[str]:
    """One line per step: the mean reward and a bar from the lowest to the highest mean of the run."""
    low, high = min(rewards), max(rewards)
    span = (high - low) or 1.0
    return [f"  {step:4d} {reward:+7.3f} |" + "#" * (1 + round((reward - low) / span * (width - 1)))
            for step, reward in enumerate(rewards, start=1)]


# --------------------------------------------------------------------------- running the commands

COMMAND = [sys.executable, "-m", "megatron_qwen.cli"]  # `megatron-qwen`, also where the venv is not on PATH

# Each stage's demo-sized settings, on top of its config file and MODEL. Batches are global (split over --nproc
# data-parallel ranks); small ones and a high learning rate: with Adam every step moves each weight by about the
# learning rate whatever the batch, and the output layer over the whole vocabulary makes every token expensive.
PRETRAIN = ("configs/tiny.yaml", ["data.split=100,0,0", "training.global_batch_size=8", "training.train_iters=20",
                                  "training.lr=5e-3", "training.min_lr=5e-4", "training.lr_warmup_iters=2",
                                  "logging.log_interval=5"])
SFT = ("configs/stage/sft.yaml", ["data.split=100,0,0", "training.global_batch_size=4", "training.train_iters=80",
                                  "training.lr=1e-2", "training.min_lr=1e-3", "training.lr_warmup_iters=5",
                                  "training.eval_interval=0", "training.save_interval=0", "logging.log_interval=10"])
REWARD = ("configs/stage/reward.yaml", ["data.split=90,10,0", "reward.epochs=null", "training.global_batch_size=32",
                                        "training.train_iters=40", "training.lr=5e-3", "training.min_lr=5e-4",
                                        "training.lr_warmup_iters=2", "training.lr_decay_style=cosine",
                                        "training.eval_interval=40", "training.eval_iters=2",
                                        "training.save_interval=0",
                                        "logging.log_interval=5"])
PPO = ("configs/stage/ppo.yaml", ["ppo.prompts_per_step=8", "ppo.samples_per_prompt=4",
                                  f"ppo.max_new_tokens={MAX_NEW_TOKENS}", "ppo.critic_warmup_steps=0",
                                  "training.lr=1e-3", "training.min_lr=1e-3", "ppo.value_lr=5e-3",
                                  "training.save_interval=0", "logging.log_interval=1"])
PPO_ROLLOUTS = 8 * 4
# 40 steps of 8 pairs (chosen and rejected side by side: 16 sequences), no weight decay (which would pull the
# policy towards 0, not towards its reference), a constant LR of 1e-4: at 3e-4 and 1e-3 (sigmoid or IPO loss)
# the held-out pairs are ranked right but both sides' log-probabilities fall until replies are random tokens.
DPO = ("configs/stage/dpo.yaml", ["data.split=90,10,0", "dpo.epochs=null", "training.global_batch_size=16",
                                  "training.train_iters=40", "training.lr=1e-4", "training.min_lr=1e-4",
                                  "training.lr_warmup_iters=0", "training.lr_decay_style=constant",
                                  "training.weight_decay=0.0", "training.eval_interval=40", "training.eval_iters=2",
                                  "training.save_interval=0", "logging.log_interval=5"])


class Demo:
    """Runs the commands of the chain in `out` on `nproc` CPU ranks, timing each phase (wall and CPU seconds)."""

    def __init__(self, out: Path, nproc: int):
        self.out, self.data, self.nproc = out, out / "data", nproc
        threads = max(1, (os.cpu_count() or 1) // nproc)
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore",
                        WANDB_MODE=os.environ.get("WANDB_MODE", "disabled"))
        self.seconds: dict[str, tuple[float, float]] = {}

    def run(self, cmd: list) -> None:
        print("$ " + " ".join(str(c) for c in cmd), flush=True)
        subprocess.run([str(c) for c in cmd], cwd=REPO, env=self.env, check=True)

    def timed(self, name: str, work, *args):
        """`work(*args)`, its wall time and its children's CPU time recorded under `name`."""
        wall, cpu = time.monotonic(), children_cpu_seconds()
        result = work(*args)
        self.seconds[name] = (time.monotonic() - wall, children_cpu_seconds() - cpu)
        return result

    def preprocess(self, flags: list, records: list[dict], name: str) -> Path:
        """`records` as NAME.jsonl, tokenized by `megatron-qwen preprocess` into shards with prefix data/NAME."""
        source = write_jsonl(self.data / f"{name}.jsonl", records)
        self.run([*COMMAND, "preprocess", *flags, "--input", source, "--output-prefix", self.data / name])
        return self.data / name

    def stage(self, name: str, recipe: tuple[str, list[str]], *overrides: str, micro_batch: int) -> Path:
        """`megatron-qwen run NAME CONFIG MODEL RECIPE OVERRIDES --nproc N`; returns the final checkpoint."""
        config, settings = recipe
        run_dir = self.out / name
        self.run([*COMMAND, "run", name, config, *MODEL, *settings, f"training.micro_batch_size={micro_batch}",
                  f"logging.run_dir={run_dir}", f"data.cache_dir={self.data / 'cache'}", *overrides,
                  "--nproc", self.nproc])
        return latest_checkpoint(run_dir / "checkpoints")

    def generate(self, ckpt: Path, prompts: Path, name: str, seed: int) -> Path:
        """`megatron-qwen generate`'s sampled replies (temperature 1) to the ChatML `prompts`, in NAME.jsonl."""
        out = self.out / f"{name}.jsonl"
        self.run([*COMMAND, "generate", "--ckpt", ckpt, "--prompts", prompts, "--chat", "--max-new-tokens",
                  MAX_NEW_TOKENS, "--temperature", "1.0", "--top-p", TOP_P, "--seed", seed, "--batch-size", 64,
                  "--out", out])
        return out


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def build_data(demo: Demo, seed: int) -> dict[str, Path]:
    """The four synthetic sets as shards (`megatron-qwen preprocess`), and the held-out evaluation prompts."""
    rng = random.Random(seed)
    length = str(SEQ_LENGTH)
    return {
        "text": demo.preprocess(["--append-eod"], pretraining_texts(rng, 2000), "text"),
        "chats": demo.preprocess(["--chat", "--max-length", length], sft_conversations(rng, 2000, 0.5), "sft"),
        "pairs": demo.preprocess(["--preference", "--max-length", length], preference_pairs(rng, 2000), "pairs"),
        "prompts": demo.preprocess(["--prompts", "--max-length", str(SEQ_LENGTH - MAX_NEW_TOKENS)], prompts(rng, 2000),
                                   "prompts"),
        "eval": write_jsonl(demo.data / "eval_prompts.jsonl", prompts(rng, EVAL_PROMPTS, HELD_OUT_SUBJECTS)),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the demo (the command line in this module's docstring); returns the exit status."""
    parser = argparse.ArgumentParser(prog="tools/demo_rlhf.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "demo_rlhf_out",
                        help="work directory (default demo_rlhf_out/)")
    parser.add_argument("--nproc", type=int, default=1, choices=(1, 2, 4),
                        help="data-parallel CPU ranks (default 1: on 2 cores the fastest)")
    parser.add_argument("--ppo-steps", type=int, default=24, help="PPO steps (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and the evaluation (default 0)")
    parser.add_argument("--dpo", action="store_true", help="end with DPO on the preference pairs instead of a reward "
                        "model and PPO")
    args = parser.parse_args(argv)
    if args.ppo_steps < 1:
        parser.error(f"--ppo-steps {args.ppo_steps} must be >= 1")
    demo = Demo(args.out.resolve(), args.nproc)
    started, load = time.monotonic(), os.getloadavg()[0]

    banner("0. synthetic data, tokenized with the Qwen tokenizer (megatron-qwen preprocess)")
    data = demo.timed("data", build_data, demo, args.seed)
    print("an SFT conversation:", json.loads(open(f"{data['chats']}.jsonl").readline())["messages"])

    banner("1. pretraining (stages.pretrain) on sentences with kind and unkind words alike")
    pretrained = demo.timed("pretrain", lambda: demo.stage(
        "pretrain", PRETRAIN, f"data.paths=[{data['text']}_text_document]", micro_batch=8 // args.nproc))

    banner("2. supervised fine-tuning in ChatML (stages.sft): one-word answers, kind or unkind")
    policy = demo.timed("sft", lambda: demo.stage(
        "sft", SFT, f"training.init_from={pretrained}", f"data.paths=[{data['chats']}]", micro_batch=4 // args.nproc))

    if args.dpo:
        return finish_with_dpo(demo, data, pretrained, policy, args, started, load)

    banner("3. reward model on preference pairs, chosen = kind, rejected = unkind (stages.reward)")
    reward_model = demo.timed("reward", lambda: demo.stage(
        "reward", REWARD, f"training.init_from={policy}", f"data.paths=[{data['pairs']}]", micro_batch=8))
    held_out = [r for r in read_metrics(demo.out / "reward") if "valid_accuracy" in r][-1]
    print(f"reward model: held-out accuracy {held_out['valid_accuracy']:.3f}, "
          f"mean margin {held_out['valid_margin']:.2f}")

    banner(f"4. PPO from the SFT policy with that reward model (stages.ppo), {args.ppo_steps} steps")
    tuned = demo.timed("ppo", lambda: demo.stage(
        "ppo", PPO, f"ppo.policy_from={policy}", f"ppo.reward_from={reward_model}", f"data.paths=[{data['prompts']}]",
        f"training.train_iters={args.ppo_steps}", micro_batch=8))

    banner("5. replies before and after PPO to questions about people the training never saw (megatron-qwen generate)")
    shares = before_and_after(demo, data, args.seed, sft=policy, ppo=tuned)

    banner("summary")
    steps = read_metrics(demo.out / "ppo")
    rewards = [r["reward_mean"] for r in steps]
    settled = steps[2:] or steps  # the first steps pay one-off costs (allocation, the first checkpoint read)
    print(f"PPO: the reward model's mean score of the {PPO_ROLLOUTS} replies sampled at each step")
    print("\n".join(reward_chart(rewards)))
    head, tail = rewards[:3], rewards[-3:]
    print(f"reward {sum(head) / len(head):+.2f} (first 3 steps) -> {sum(tail) / len(tail):+.2f} (last 3 steps); "
          f"reward model held-out accuracy {held_out['valid_accuracy']:.3f}")
    print_shares(shares)
    print("one PPO step, median of steps 3 on (seconds): " + ", ".join(
        f"{phase} {median(r[f'seconds_{phase}'] for r in settled):.2f}" for phase in ("generate", "score", "train"))
        + f"; generation {median(r['generation_tokens_per_s'] for r in settled):.0f} new tokens/s")
    print_times(demo, args.nproc, started, load)
    print(f"checkpoints:\n  pretrained   {pretrained}\n  SFT          {policy}\n  reward model {reward_model}\n"
          f"  PPO policy   {tuned}")
    banner("the PPO run's curves (megatron-qwen plot)")
    demo.run([*COMMAND, "plot", demo.out / "ppo"])  # prints the chart's path, the demo's last line
    return 0


def before_and_after(demo: Demo, data: dict, seed: int, **checkpoints: Path) -> dict[str, dict[str, float]]:
    """Each checkpoint's reply shares on the held-out questions (NAME=checkpoint, in order), its first replies
    printed."""
    shares = {}
    for name, ckpt in checkpoints.items():
        generations = demo.timed(f"eval {name}", demo.generate, ckpt, data["eval"], f"replies_{name}", seed)
        shares[name] = reply_shares(generations)
        replies = [json.loads(line)["text"] for line in generations.read_text().splitlines()[:10]]
        print(f"{name.upper()} policy, first replies: {replies}")
    return shares


def print_shares(shares: dict[str, dict[str, float]]) -> None:
    print(f"replies to {EVAL_PROMPTS} held-out questions, sampled at temperature 1, judged by the word lists:")
    for name, share in shares.items():
        print(f"  {name.upper()} policy: kind {share['kind']:.2f}, unkind {share['unkind']:.2f}, "
              f"other {share['other']:.2f}")


def print_times(demo: Demo, nproc: int, started: float, load: float) -> None:
    print("time per phase (wall s, CPU s of the commands):")
    for name, (wall, cpu) in demo.seconds.items():
        print(f"  {name:9s} {wall:6.0f} {cpu:7.0f}")
    print(f"  {'total':9s} {time.monotonic() - started:6.0f}   on {nproc} rank(s), {os.cpu_count()} cores, "
          f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")


def finish_with_dpo(demo: Demo, data: dict, pretrained: Path, policy: Path, args, started: float, load: float) -> int:
    """Steps 3-5 of `--dpo`: DPO from the SFT policy on the preference pairs, the replies before and after, the
    summary and the DPO run's curves; returns the exit status."""
    banner("3. DPO from the SFT policy on preference pairs, chosen = kind, rejected = unkind (stages.dpo)")
    tuned = demo.timed("dpo", lambda: demo.stage(
        "dpo", DPO, f"training.init_from={policy}", f"data.paths=[{data['pairs']}]", micro_batch=8 // args.nproc))
    held_out = [r for r in read_metrics(demo.out / "dpo") if "valid_accuracy" in r][-1]

    banner("4. replies before and after DPO to questions about people the training never saw (megatron-qwen generate)")
    shares = before_and_after(demo, data, args.seed, sft=policy, dpo=tuned)

    banner("summary")
    steps = [r for r in read_metrics(demo.out / "dpo") if "loss" in r]
    print("DPO: " + "; ".join(f"step {r['step']} loss {r['loss']:.3f} accuracy {r['accuracy']:.2f}" for r in steps))
    print(f"DPO held-out pairs: reward accuracy {held_out['valid_accuracy']:.3f}, "
          f"mean margin {held_out['valid_margin']:.2f}")
    print_shares(shares)
    print_times(demo, args.nproc, started, load)
    print(f"checkpoints:\n  pretrained   {pretrained}\n  SFT          {policy}\n  DPO policy   {tuned}")
    banner("the DPO run's curves (megatron-qwen plot)")
    demo.run([*COMMAND, "plot", demo.out / "dpo"])  # prints the chart's path, the demo's last line
    return 0


if __name__ == "__main__":
    sys.exit(main())
