"""The method's pieces that training and evaluation share, so that the two cannot drift apart.

How a conversation goes (Sec. 3, step 1): `SimulationSettings`, the dialogue loop `simulate` and `simulate_pairs`,
which 02_simulate.py runs on the training pairs and 05_eval.py on the test pairs (toy_base.py's warm-up cuts
questions as they do). What each role is told and sees is in roles.py.
The reward (Sec. 3, step 2): `gold_logprob`, with which 03_select.py scores the training conversations and
05_eval.py the test conversations.
Which training split an iteration simulates (`split_of_iteration`) and which model Q_t is (`questioner_adapter`).
"""

from dataclasses import dataclass, field
from pathlib import Path

from models import truncated
from roles import answer_view, questioner_view, roleplayer_view
from utils import StepError, resumable, stable_hash


# --- The conversation (Sec. 3, step 1) ----------------------------------------------------------------

@dataclass
class SimulationSettings:
    """How a conversation goes, in training (02) and in evaluation (05): one set of flags, so the two agree."""

    _argument_group_name = "simulation settings (the same in 02_simulate.py and 05_eval.py)"
    min_turns: int = field(default=1, metadata={"help": "fewest question-answer turns (paper: 1)"})
    max_turns: int = field(default=3, metadata={
        "help": "most question-answer turns (paper: 3); 05's test conversations are balanced over "
                "min_turns .. max_turns"})
    temperature: float = field(default=0.9, metadata={"help": "Questioner sampling temperature (paper: 0.9)"})
    top_p: float = field(default=0.9, metadata={"help": "Questioner nucleus sampling (paper: 0.9)"})
    question_max_tokens: int = field(default=64, metadata={"help": "token cap of a question"})
    answer_max_tokens: int = field(default=96, metadata={"help": "token cap of a Roleplayer answer (<= 3 sentences)"})

    def __post_init__(self):
        if not 1 <= self.min_turns <= self.max_turns:
            raise StepError("--min_turns and --max_turns need 1 <= min_turns <= max_turns")


def generation_settings(sim: SimulationSettings, batch_size: int) -> dict:
    """Per role: the Questioner samples (Sec. 4.2: T 0.9, top_p 0.9), the Roleplayer answers greedily."""
    return {"questioner": dict(max_new_tokens=sim.question_max_tokens, temperature=sim.temperature,
                               top_p=sim.top_p, batch_size=batch_size),
            "roleplayer": dict(max_new_tokens=sim.answer_max_tokens, temperature=0.0, top_p=1.0,
                               batch_size=batch_size)}


def cut_at_question(text: str) -> str:
    """Keep a Questioner turn up to its first question mark: one question per turn (App. A)."""
    end = text.find("?")
    return text[:end + 1].strip() if end >= 0 else text.strip()


def simulate(questioner, roleplayer, items, gen, seed):
    """The dialogue of Sec. 3 for many conversations at once, one batched call per role per turn.

    items: dicts with name, task, bio, n_turns. gen: generation settings per role (generation_settings).
    Each turn the Questioner, seeing the task but not the persona (roles.questioner_view), asks; its turn is
    cut at the first question mark; the Roleplayer, seeing the persona and the dialogue with the roles
    swapped (roles.roleplayer_view), answers. Returns one dialogue (list of messages) per item, each of
    exactly n_turns question-answer turns and ending on an answer, and per item whether any of its turns was
    generated from a prompt cut to fit the model's context.
    """
    dialogues, cut = [[] for _ in items], [False for _ in items]
    for turn in range(max(item["n_turns"] for item in items)):
        active = [i for i, item in enumerate(items) if item["n_turns"] > turn]
        views = [questioner_view(items[i]["name"], items[i]["task"], dialogues[i]) for i in active]
        questions = questioner.generate(views, seed=seed + 1000 * turn, desc=f"turn {turn + 1} questions",
                                        **gen["questioner"])
        for i, q, c in zip(active, questions, truncated(questioner, views, gen["questioner"]["max_new_tokens"])):
            dialogues[i].append({"role": "assistant", "content": cut_at_question(q)})
            cut[i] |= c
        views = [roleplayer_view(items[i]["bio"], items[i]["task"], dialogues[i]) for i in active]
        answers = roleplayer.generate(views, seed=seed + 1000 * turn, desc=f"turn {turn + 1} answers",
                                      **gen["roleplayer"])
        for i, a, c in zip(active, answers, truncated(roleplayer, views, gen["roleplayer"]["max_new_tokens"])):
            dialogues[i].append({"role": "user", "content": a.strip()})
            cut[i] |= c
    return dialogues, cut


def simulate_pairs(questioner, roleplayer, pairs, sim: SimulationSettings, *, n_conversations: int, seed: int,
                   batch_size: int, chunk_pairs: int, iteration: int, final: Path, tag: str,
                   desc: str | None = None) -> list[dict]:
    """N conversations for each pair (each pair carries its n_turns), saved chunk by chunk.

    A chunk's sampling seed depends only on (seed, tag, chunk index), so a resumed run regenerates a
    half-saved chunk exactly, and models evaluated with the same tag face the same random draws.
    desc: the progress bar's label (default: "simulate <tag>").
    """
    gen = generation_settings(sim, batch_size)
    items = [p for p in pairs for _ in range(n_conversations)]
    keys = [(p["task_id"], p["persona_id"], n) for p in pairs for n in range(n_conversations)]

    def make_records(index, chunk, chunk_keys):
        dialogues, cut = simulate(questioner, roleplayer, chunk, gen, seed=stable_hash(seed, tag, index))
        return [{"task_id": k[0], "persona_id": k[1], "conv_id": k[2], "iteration": iteration,
                 "n_turns": item["n_turns"], "questioner": questioner.name, "roleplayer": roleplayer.name,
                 "messages": d, "sampling": gen, "truncated": c}
                for k, item, d, c in zip(chunk_keys, chunk, dialogues, cut)]

    return resumable(final, "conversation", items, keys, chunk_pairs * n_conversations, desc or f"simulate {tag}",
                     make_records)


# --- An iteration's Questioner and pairs --------------------------------------------------------------

def questioner_adapter(run_dir, t: int):
    """Q_t is Q_BASE plus the LoRA adapter 04_train.py wrote at iteration t-1 (none at t = 0); each adapter is
    trained from Q_BASE (Sec. 3, step 5), not from Q_{t-1}. Returns (adapter name, folder) or None."""
    return None if t == 0 else (f"m{t}", Path(run_dir) / f"iter{t - 1}" / "adapter")


def split_of_iteration(t: int) -> str:
    """Iterations alternate between the two training splits: A, B, A, ... (Sec. 4.2 of the paper)."""
    return "A" if t % 2 == 0 else "B"


# --- The reward (Sec. 3, step 2) ----------------------------------------------------------------------

def gold_logprob(scorer, pairs: list[dict], dialogues: list[list[dict]], batch_size: int) -> list[tuple]:
    """The reward of each conversation: log p_BASE(gold | the Questioner's whole prompt, the dialogue, the
    task restated), summed over the gold response's tokens (Sec. 3, step 2; 05_eval.py scores test
    conversations with it too). pairs: dicts with name, task and gold, one per dialogue. The scorer runs with
    every adapter switched off, so it is Q_BASE even when Q_t shares its weights.
    Returns (logprob, n_tokens scored, truncated) per dialogue."""
    contexts = [answer_view(p["name"], p["task"], d) for p, d in zip(pairs, dialogues)]
    return scorer.score(contexts, [p["gold"] for p in pairs], adapter=None, batch_size=batch_size)
