"""How often the embedded Questioner asks a question, by turn, under prompt variants (issue #7, part 1).

    python bench/question_rate.py base|nudge|examples3|both [QUESTION_MAX_TOKENS (default 32)]

48 conversations of 3 turns (24 tasks x 2 personas), the embedded model as Questioner (T 0.9, top_p 0.9)
and Roleplayer (greedy); prints the share of Questioner turns containing "?" by turn. nudge: each
Roleplayer reply, as the Questioner sees it, ends with "(Ask me your next question.)"; examples3: the
worked example shows three questions in a row; both: the two together (roles.py's current view); base:
neither (the earlier view). Variants patch the view the steps' dialogue loop (stargate.simulate) uses, in this
process only. Local models compute as the steps do (--dtype auto).
"""
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import roles  # noqa: E402
import stargate  # noqa: E402
from models import ModelPool  # noqa: E402


variant = sys.argv[1]
question_max_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 32  # the tiny preset's cap
tasks = [json.loads(l)["text"] for l in open(ROOT / "data" / "tasks.jsonl")][:24]
personas = [json.loads(l) for l in open(ROOT / "data" / "personas.jsonl")]
items = [{"name": personas[(i + k) % 12]["name"], "bio": personas[(i + k) % 12]["bio"], "task": t, "n_turns": 3}
         for i, t in enumerate(tasks) for k in range(2)]
# roles.py holds the current view (`both`); the other variants take back one change or both.
current_view = roles.questioner_view
if variant in ("base", "examples3"):  # no nudge: the dialogue as it was said
    stargate.questioner_view = lambda name, task, dialogue: current_view(name, task, []) + dialogue
if variant in ("base", "nudge"):  # the worked example with two questions in a row, not three
    del roles.QUESTIONER_EXAMPLES[4:6]
pool = ModelPool(str(ROOT / "cache"), "no")
chat = pool.chat("embedded")
gen = {"questioner": dict(max_new_tokens=question_max_tokens, temperature=0.9, top_p=0.9, batch_size=48),
       "roleplayer": dict(max_new_tokens=48, temperature=0.0, top_p=1.0, batch_size=48)}
t = time.time()
dialogues, _ = stargate.simulate(chat, chat, items, gen, seed=0)
by_turn = [[("?" in d[2 * k]["content"]) for d in dialogues] for k in range(3)]
rate = [sum(x) / len(x) for x in by_turn]
print(variant, f"cap {question_max_tokens}", "question rate by turn", [f"{r:.0%}" for r in rate],
      f"all {sum(map(sum, by_turn)) / (3 * len(dialogues)):.0%}", f"{time.time() - t:.0f} s")
