"""The four roles of STaR-GATE (Sec. 3 and App. A of the paper): what each is told, what each sees.

Questioner Q  sees the task and the user's first name, never the persona; asks one question per turn.
Roleplayer R  plays the hidden persona in first person; answers briefly; never solves the task.
Oracle        sees persona + task; writes the personalised "gold" response (and writes the personas).
Judge         sees persona + task + two responses; names the one better fitted to this user.

Conversations are stored from the Questioner's side: a list of {"role", "content"} messages where
"assistant" is the Questioner and "user" is the Roleplayer. Each role gets its own view of that list
here, so the Roleplayer's "user" is the Questioner. The dialogue loop that uses these views is in
02_simulate.py. This module is text only: it imports no model code.
"""

import hashlib
import json
import re
import string

QUESTIONER_SYSTEM = (
    "You are a helpful assistant. Before you answer a request, find out what the user wants by asking "
    "clarifying questions about their preferences, situation and constraints. Ask exactly ONE short "
    "question per turn and stop after the question mark. Do not answer the request until you are asked "
    "to.\nGood questions look like: \"Do you have any dietary restrictions?\", \"What is your budget?\", "
    "\"Who will be coming with you?\", \"What did you enjoy about the last one you tried?\""
)

# Appended to a Roleplayer answer as the Questioner sees it, when a question is to follow.
NEXT_QUESTION = "(Ask me your next question.)"

# A worked example shown to the Questioner as earlier chat turns, before the real request. Small models
# imitate turns far more than they follow instructions: with it the embedded model's first turn is a
# question ~95% of the time, without it ~20% (measured on 24 tasks). These turns are never trained on.
# Its answers end with NEXT_QUESTION exactly as the dialogue's do (questioner_view): shown only in the
# dialogue, the toy base model echoed it instead of asking, "What's your next question?" in 42% of its
# second turns (bench/later_turns.py; 0% with the example in the same format).
QUESTIONER_EXAMPLES = [
    {"role": "user", "content": "Hi, I'm Sam. Can you recommend a movie for tonight?"},
    {"role": "assistant", "content": "What kinds of movies do you usually enjoy?"},
    {"role": "user", "content": f"Mostly old science-fiction films, the slower the better.\n\n{NEXT_QUESTION}"},
    {"role": "assistant", "content": "Will you be watching alone or with others?"},
    {"role": "user", "content": f"With my partner, who prefers comedies.\n\n{NEXT_QUESTION}"},
    {"role": "assistant", "content": "How long a film do you have time for?"},
    {"role": "user", "content": "Hi, I'm Lee. Help me plan a birthday dinner."},
    {"role": "assistant", "content": "Who is the dinner for, and what food do they like?"},
]

ROLEPLAYER_SYSTEM = (
    "You are role-playing this person. Speak as them, in the first person:\n\n{bio}\n\n"
    "An assistant is helping you with this request of yours: \"{task}\". It will ask you questions. "
    "Answer each question truthfully as this person, in at most three sentences, with concrete details "
    "from your life. Do not answer the request yourself and do not ask questions back."
)

FINAL_ANSWER_PROMPT = (
    "Thanks for the questions. Now please answer my original request, using what I told you about myself: "
    "{task}"
)

ORACLE_SYSTEM = "You are an expert assistant who writes helpful, personalised, concrete answers."

ORACLE_GOLD_PROMPT = (
    "Here is a description of a user, written by them:\n\n{bio}\n\n"
    "The user asks: \"{task}\"\n\n"
    "Write the best possible answer to this user. Use what you know about them to tailor it, address "
    "them directly as \"you\", and do not mention that you were given a description. Answer directly; "
    "do not refuse and do not ask questions."
)

PERSONA_PROMPT = (
    "Here are short biographies that people wrote about themselves:\n\n{examples}\n\n"
    "Write a new biography, in the same style, for a different person whose first name is {name}. "
    "Start with \"My name is {name}.\" Use at most ten sentences covering their job, hobbies, family, "
    "food tastes, budget, where they live and what they like and dislike. Make them unlike the people above."
)

JUDGE_SYSTEM = "You are a careful, impartial judge of how well answers fit a particular user."

JUDGE_PROMPT = (
    "A user described themselves like this:\n\n{bio}\n\n"
    "The user asked: \"{task}\"\n\n"
    "Response A:\n{a}\n\nResponse B:\n{b}\n\n"
    "Which response is better fitted to this particular user's preferences and situation? First write "
    "one or two sentences comparing them, then end with a final line of the form \"Verdict: A\" or "
    "\"Verdict: B\"."
)


def first_turn(name: str, task: str) -> str:
    """The user's opening message: their first name (App. A) and the task."""
    return f"Hi, I'm {name}. {task}"


def questioner_view(name: str, task: str, dialogue: list[dict], ask_after_last: bool = True) -> list[dict]:
    """What the Questioner sees: its instructions and example, the user's request, the dialogue so far.

    Each Roleplayer answer the Questioner replies to with a question ends with NEXT_QUESTION: without it a
    small model drifts into answering by the third turn. ask_after_last=False leaves the last answer bare,
    for answer_view, which follows it with the request for the final answer instead.
    """
    last = len(dialogue) - 1
    shown = [dict(m, content=f"{m['content']}\n\n{NEXT_QUESTION}")
             if m["role"] == "user" and (ask_after_last or i < last) else m for i, m in enumerate(dialogue)]
    return [{"role": "system", "content": QUESTIONER_SYSTEM}, *QUESTIONER_EXAMPLES,
            {"role": "user", "content": first_turn(name, task)}] + shown


def roleplayer_view(bio: str, task: str, dialogue: list[dict]) -> list[dict]:
    """What the Roleplayer sees: its persona, then the dialogue with the roles swapped."""
    swapped = [{"role": "user" if m["role"] == "assistant" else "assistant", "content": m["content"]}
               for m in dialogue]
    return [{"role": "system", "content": ROLEPLAYER_SYSTEM.format(bio=bio, task=task)}] + swapped


def answer_view(name: str, task: str, dialogue: list[dict]) -> list[dict]:
    """The Questioner's view when it must answer: the dialogue, then the task restated (Sec. 3).

    The restatement follows the last answer in the same user turn (templates need alternating roles).
    This is also the context in which the gold response is scored (03_select.py's gold_logprob), so an
    edit to any text this view shows changes the reward.
    """
    return questioner_view(name, task, dialogue, ask_after_last=False) + [
        {"role": "user", "content": FINAL_ANSWER_PROMPT.format(task=task)}]


def _fingerprint(*texts) -> str:
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:12]


# What each role is shown, as a short hash per role: outputs made under other prompts are other results, so a
# step records the hashes of the roles it prompts beside its settings, and a rerun under other prompts stops
# (utils.check_rerun). Taken from the views of a fixed dialogue: editing a comment here changes nothing, editing
# any text a model sees changes its role's hash.
_DIALOGUE = [{"role": "assistant", "content": "Q?"}, {"role": "user", "content": "A."}]
PROMPTS = {"questioner": _fingerprint(questioner_view("N", "T.", _DIALOGUE), answer_view("N", "T.", _DIALOGUE)),
           "roleplayer": _fingerprint(roleplayer_view("B.", "T.", _DIALOGUE)),
           "oracle": _fingerprint(ORACLE_SYSTEM, ORACLE_GOLD_PROMPT, PERSONA_PROMPT),
           "judge": _fingerprint(JUDGE_SYSTEM, JUDGE_PROMPT)}


# Gold answers the Oracle should not have written: a refusal or apology instead of an answer (small Oracles
# write "I'm sorry, as an AI I cannot..." often), nothing at all, or the same line over and over.
REFUSAL = re.compile(r"\b(?:I'?m sorry|I am sorry|I apologi[sz]e|as an AI|I cannot|I can'?t|I can not|"
                     r"I(?:'m| am) (?:unable|not able|not capable)|unfortunately,? I)\b", re.IGNORECASE)


def gold_problem(text: str) -> str | None:
    """'empty', 'refusal' or 'repetition' when a gold answer is unusable; None when it looks like an answer."""
    if not text.strip():
        return "empty"
    if REFUSAL.search(text):
        return "refusal"
    lines = [line.strip() for line in re.split(r"[\n.!?]+", text) if len(line.strip()) >= 10]
    if lines and max(lines.count(line) for line in lines) >= 3:
        return "repetition"
    return None


def answer_problem(text: str) -> str | None:
    """'empty', 'refusal' or 'question' when a final answer is no answer at all; None when it is one.

    A question: the answer asks the user something (it has a question mark) instead of only answering;
    small models often reply to "now please answer" with another question ("What's your budget?") or with
    "What's your next question?". The toy Judge lets such an answer lose to any real one; 05 counts them.
    """
    if not text.strip():
        return "empty"
    if REFUSAL.search(text):
        return "refusal"
    return "question" if "?" in text else None


# "Verdict: A", "**Verdict**: b", "Verdict: (A)", "Verdict: Response B"; not "Verdict: a tie" or "Both".
VERDICT = re.compile(r"verdict[\s*:\-]*\(?\s*(?:response\s+)?([AB])(?![A-Za-z])(?!\s+(?:tie|and|or)\b)",
                     re.IGNORECASE)


def parse_verdict(text: str) -> str | None:
    """'A' or 'B' from the Judge's last 'Verdict: X' line; None when there is none (never guessed)."""
    found = VERDICT.findall(text or "")
    return found[-1].upper() if found else None


def unformat(template: str, text: str) -> dict | None:
    """The inverse of template.format(**fields): the fields, or None when text was not made from it.
    Lets a role played without a model (scripted.py, human.py) read what its prompt says."""
    pattern, seen = "", set()
    for literal, field, _, _ in string.Formatter().parse(template):
        pattern += re.escape(literal)
        if field is not None:
            pattern += f"(?P={field})" if field in seen else f"(?P<{field}>.*?)"
            seen.add(field)
    found = re.fullmatch(pattern, text, re.DOTALL)
    return found.groupdict() if found else None
