"""Step 3: score, select and regularise (Sec. 3, steps 2-4 of one STaR-GATE iteration).

Reads   <run_dir>/iter{t}/conversations.jsonl (02_simulate.py) and the run's gold responses.
Writes  <run_dir>/iter{t}/scores.jsonl  the gold log-prob of EVERY conversation (the analysis data)
        <run_dir>/iter{t}/sft.jsonl     fine-tuning records: each kept conversation + a final answer,
                                        every message marked with whether it is trained on

1. Score (the reward): the summed log-prob of the pair's gold response under the FIXED base model Q_BASE
   (never the current model), as the assistant turn after the context the Questioner answers in,
   roles.answer_view. That context is the WHOLE Questioner prompt, not only the dialogue (stargate.gold_logprob):
     - the Questioner's instructions (roles.QUESTIONER_SYSTEM, with its example questions),
     - the worked example of earlier chat turns (roles.QUESTIONER_EXAMPLES),
     - the user's first turn: their first name and the task (roles.first_turn),
     - the conversation, each Roleplayer answer that a question followed ending with the nudge
       roles.NEXT_QUESTION,
     - the task restated after the last answer (roles.FINAL_ANSWER_PROMPT), in the same user turn.
   So an edit to any of these prompts changes every score, and with them which conversations are kept.
2. Select: keep the top k of the N conversations of each pair (paper: k = 1, N = 10).
3. Regularise: Q_t writes its own final answer (greedy) after each kept conversation, prompted to use
   what the user revealed, so training does not shift its answers away from its own (Sec. 3, Eq. 2).
   --target gold trains on the Oracle's answer instead, --target none on the questions only (the
   paper's two ablations).

    python 03_select.py --run_dir runs/tiny --iteration 0
"""

from dataclasses import dataclass, field
from pathlib import Path

from models import ModelSettings, truncated
from roles import answer_view, questioner_view
from specs import check_specs
from stargate import gold_logprob, questioner_adapter, split_of_iteration
from utils import (StepError, check_rerun, load_pairs, parse_args, read_jsonl, record_args, record_key,
                   recorded_setting, resumable, run_main, seed_everything)

PROMPTED = ("questioner",)  # roles.py's prompts this step's outputs depend on


@dataclass
class Args:
    run_dir: str = field(default="runs/tiny", metadata={"help": "folder of this run"})
    iteration: int = field(default=0, metadata={"help": "t: select from the conversations of Q_t"})
    questioner: str = field(default="embedded", metadata={
        "help": "Q_BASE model spec (scores; with adapter m_t, answers); openai:<base model>@<url>: both on that "
                "server, with --tokenizer (docs/CLUSTER.md)"})
    n_conversations: int | None = field(default=None, metadata={
        "help": "N: use conversations 0..N-1 of each pair (default: the N that 02 simulated, from its record)"})
    top_k: int = field(default=1, metadata={"help": "k conversations kept per pair (paper: 1)"})
    target: str = field(default="own", metadata={
        "help": "final message trained on: own (Q_t's answer, the method), gold (ablation), none (questions only)",
        "choices": ["own", "gold", "none"]})
    answer_max_tokens: int = field(default=300, metadata={"help": "token cap of Q_t's final answer"})
    seed: int = field(default=0, metadata={"help": "seed (answers are greedy; kept for the record)"})
    batch_size: int = field(default=16, metadata={"help": "sequences per scoring or generation batch"})
    chunk_size: int = field(default=64, metadata={"help": "records computed (and saved) together"})
    overwrite: bool = field(default=False, metadata={
        "help": "redo the iteration's scores and selection even if they exist (a rerun with other settings stops "
                "otherwise)"})


def top_k(scores: list[dict], k: int) -> list[dict]:
    """The k highest-scoring conversations of each pair; ties go to the lower conv_id (deterministic)."""
    by_pair = {}
    for s in scores:
        by_pair.setdefault((s["task_id"], s["persona_id"]), []).append(s)
    kept = []
    for pair in sorted(by_pair):
        kept += sorted(by_pair[pair], key=lambda s: (-s["logprob"], s["conv_id"]))[:k]
    return kept


def main():
    args, model_args = parse_args(Args, ModelSettings)
    seed_everything(args.seed)
    out = Path(args.run_dir) / f"iter{args.iteration}"
    check_specs(questioner=args.questioner)
    if args.n_conversations is None:  # N is 02's setting: one source of truth
        args.n_conversations = recorded_setting(out / "args_02_simulate.json", "n_conversations")
    check_rerun(out / "args_03_select.json", [out / name for name in ("scores.jsonl", "scores.partial.jsonl",
                                                                      "sft.jsonl", "sft.partial.jsonl")],
                args.overwrite, args, model_args, prompts=PROMPTED)
    if (out / "sft.jsonl").exists():
        print(f"03_select: {out / 'sft.jsonl'} exists; nothing to do")
        return
    if not 1 <= args.top_k <= args.n_conversations:
        raise StepError("--top_k must be between 1 and --n_conversations")

    pairs = {(p["task_id"], p["persona_id"]): p  # a pair without a usable gold answer has no reward: left out
             for p in load_pairs(args.run_dir, split_of_iteration(args.iteration), usable_only=True)}
    source = out / "conversations.jsonl"
    conversations = [c for c in read_jsonl(source, "conversation") if c["conv_id"] < args.n_conversations]
    for c in conversations:
        if (c["task_id"], c["persona_id"]) not in pairs:
            raise StepError(f"{source}: conversation {record_key('conversation', c)} names a pair that is "
                            f"not in the split of iteration {args.iteration}")
    expected = len(pairs) * args.n_conversations
    if len(conversations) != expected:
        raise StepError(f"{source}: {len(conversations)} conversations with conv_id < {args.n_conversations}, "
                        f"expected {expected} ({len(pairs)} pairs x N); is --n_conversations above 02's N?")
    pool = model_args.pool()

    # 1. Score every conversation by log p_BASE(gold | the Questioner's prompt, the conversation, the task).
    scorer = pool.scorer(args.questioner)
    record_args(out / "args_03_select.json", args, model_args, prompts=PROMPTED)

    def score_records(_, chunk, keys):
        results = gold_logprob(scorer, [pairs[k[:2]] for k in keys], [c["messages"] for c in chunk], args.batch_size)
        return [{"task_id": c["task_id"], "persona_id": c["persona_id"], "conv_id": c["conv_id"],
                 "iteration": args.iteration, "n_turns": c["n_turns"], "logprob": lp, "n_tokens": n,
                 "scorer": scorer.spec, "truncated": cut} for c, (lp, n, cut) in zip(chunk, results)]

    keys = [record_key("conversation", c) for c in conversations]
    scores = resumable(out / "scores.jsonl", "score", conversations, keys, args.chunk_size, "score (Q_BASE)",
                       score_records)

    # 2. Keep the top k conversations of each pair.
    kept = top_k(scores, args.top_k)
    by_key = {record_key("conversation", c): c for c in conversations}

    # 3. The final message: Q_t's own greedy answer (the method), the gold answer, or none.
    questioner = pool.chat(args.questioner, adapter=questioner_adapter(args.run_dir, args.iteration), questioner=True)

    def sft_records(_, chunk, keys):
        convs = [by_key[k] for k in keys]
        views = [answer_view(pairs[k[:2]]["name"], pairs[k[:2]]["task"], c["messages"]) for k, c in zip(keys, convs)]
        cut = [False] * len(keys)
        if args.target == "own":
            finals = questioner.generate(views, max_new_tokens=args.answer_max_tokens, temperature=0.0,
                                         batch_size=args.batch_size)
            cut = truncated(questioner, views, args.answer_max_tokens)
        elif args.target == "gold":
            finals = [pairs[k[:2]]["gold"] for k in keys]
        records = []
        for i, (k, s, c) in enumerate(zip(keys, chunk, convs)):
            # Loss on the Questioner's own turns (questions, final answer); never on system, user or example turns.
            if args.target == "none":
                messages = questioner_view(pairs[k[:2]]["name"], pairs[k[:2]]["task"], c["messages"])
            else:
                messages = views[i] + [{"role": "assistant", "content": finals[i].strip()}]
            fixed = len(questioner_view(pairs[k[:2]]["name"], pairs[k[:2]]["task"], []))  # instructions, example
            records.append({"task_id": k[0], "persona_id": k[1], "conv_id": k[2], "iteration": args.iteration,
                            "logprob": s["logprob"], "target": args.target, "answerer": questioner.name,
                            "messages": [dict(m, train=position >= fixed and m["role"] == "assistant")
                                         for position, m in enumerate(messages)], "truncated": cut[i]})
        return records

    keys = [record_key("score", s) for s in kept]
    sft = resumable(out / "sft.jsonl", "sft", kept, keys, args.chunk_size, f"answers ({args.target})", sft_records)

    mean = sum(s["logprob"] for s in scores) / len(scores)
    best = sum(s["logprob"] for s in kept) / len(kept)
    empty = sum(not r["messages"][-1]["content"] for r in sft)
    cut_scores, cut_answers = (sum(r.get("truncated", False) for r in records) for records in (scores, sft))
    print(f"03_select: scored {len(scores)} conversations (mean gold log-prob {mean:.1f}, kept top-{args.top_k} "
          f"mean {best:.1f}); wrote {len(kept)} records (target {args.target}, {empty} empty final messages) "
          f"to {out / 'sft.jsonl'}; cut to fit the context: {cut_scores} scored pairs, {cut_answers} answer prompts")


if __name__ == "__main__":
    run_main(main)
