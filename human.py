"""A person at the terminal plays a role: the model spec `human`, for the Roleplayer or the Judge.

Never chosen by a preset: it is for a learner who wants to feel what training changed. Play the hidden
persona against the untrained Questioner m0 and the trained m2 of a finished toy run (`bash run_all.sh toy`),
in a fresh evaluation folder that reuses that run's data and adapters (05 reads m_t's adapter from
<run_dir>/iter{t-1}/adapter):

    mkdir -p runs/play && for d in data iter0 iter1; do ln -sfn "$PWD/runs/toy/$d" runs/play/$d; done
    python 05_eval.py --run_dir runs/play --iterations 2 --questioner hf:cache/toy-base --roleplayer human \
        --judge scripted:data/toy --test_pairs 2 --n_conversations 1 --chunk_pairs 1 --question_max_tokens 24 \
        --final_max_tokens 40

m0, then m1, then m2 (the progress bar names the one asking) ask you about the same two requests (one and two
turns); the scripted Judge then compares their final answers, and runs/play/eval/report.md has the result.
Or judge the answers yourself, the scripted Roleplayer answering (per test pair and model two comparisons,
m_t's answer and m0's after m_t's conversation, each against m0's and in both orders):

    mkdir -p runs/judge && for d in data iter0; do ln -sfn "$PWD/runs/toy/$d" runs/judge/$d; done
    python 05_eval.py --run_dir runs/judge --iterations 1 --questioner hf:cache/toy-base --judge human \
        --roleplayer scripted:data/toy --test_pairs 2 --n_conversations 1 --question_max_tokens 24 \
        --final_max_tokens 40

Each prompt shows what that role sees (Roleplayer: the persona, the request and the Questioner's latest
question; Judge: the persona, the request and both responses) and reads one line. Ctrl-D ends the step
cleanly; what is finished is kept and the same command goes on from there: a conversation is saved when
its chunk is (--chunk_pairs 1: each test pair's conversation on its own), a verdict as soon as it is given
(the Judge's call cache).
"""

import sys
import textwrap

from roles import JUDGE_PROMPT, ROLEPLAYER_SYSTEM, unformat
from utils import StepError, Stopped

RULE = "-" * 72


def indented(text: str) -> str:
    return textwrap.indent(text.strip(), "    ")


class HumanChat:
    """Shows each prompt's relevant part on stdout and reads the person's answer, one line, from stdin."""

    name = "human"

    def __init__(self, stdin=None, stdout=None):
        self.stdin, self.stdout = stdin, stdout  # None: the process's own, looked up at each call
        self.persona = None  # the last persona shown, not shown again while it stays the same

    def generate(self, prompts, max_new_tokens=128, temperature=0.0, top_p=1.0, seed=0, batch_size=16,
                 desc=None, seeds=None, on_result=None):
        """One answer per prompt, typed by the person (token caps and sampling do not apply to a person).
        on_result(i, text) fires as each answer is given (CachedChat saves it at once)."""
        outputs = []
        for i, messages in enumerate(prompts):
            outputs.append(self.answer(messages))
            if on_result:
                on_result(i, outputs[-1])
        return outputs

    def answer(self, messages) -> str:
        persona = unformat(ROLEPLAYER_SYSTEM, messages[0]["content"]) if messages[0]["role"] == "system" else None
        if persona is not None:
            return self.play_roleplayer(persona, messages[1:])
        judged = unformat(JUDGE_PROMPT, messages[-1]["content"])
        if judged is not None:
            return self.play_judge(judged)
        raise StepError(f"'human' plays the Roleplayer or the Judge only; this prompt is for another role: "
                        f"{messages[-1]['content'][:80]!r}")

    def play_roleplayer(self, persona: dict, dialogue: list[dict]) -> str:
        """The dialogue as the Roleplayer sees it: the Questioner's turns are "user", the person's "assistant"."""
        lines = ["", RULE]
        if persona != self.persona or len(dialogue) == 1:  # a new conversation, or another person's
            lines += ["You play this person (answer as them, in the first person, in at most three sentences):",
                      indented(persona["bio"]), f'Your request to the assistant: "{persona["task"]}"', ""]
            self.persona = persona
        for m in dialogue[:-1]:
            lines.append(f"  {'Assistant' if m['role'] == 'user' else 'You'}: {m['content']}")
        lines.append(f"Assistant asks: {dialogue[-1]['content']}")
        return self.read("\n".join(lines), "Your answer (one line; Ctrl-D stops)> ", lambda text: text)

    def play_judge(self, fields: dict) -> str:
        self.persona = None
        shown = "\n".join(["", RULE, "You judge which response fits this user better. The user:",
                           indented(fields["bio"]), f'The user asked: "{fields["task"]}"', "",
                           "Response A:", indented(fields["a"]), "", "Response B:", indented(fields["b"])])
        verdict = self.read(shown, "Which fits this user better, A or B? (Ctrl-D stops)> ",
                            lambda text: text.upper() if text.upper() in ("A", "B") else None)
        return f"Verdict: {verdict}"  # the line roles.parse_verdict reads

    def read(self, shown: str, question: str, accept) -> str:
        """Show the context, then ask until accept(line) gives an answer; end of input stops the step."""
        stdin, stdout = self.stdin or sys.stdin, self.stdout or sys.stdout
        print(shown, file=stdout)
        while True:
            print(question, end="", file=stdout, flush=True)
            line = stdin.readline()
            if not line:  # Ctrl-D, or the end of piped input
                print(file=stdout)
                raise Stopped("end of input (Ctrl-D)")
            answer = accept(line.strip()) if line.strip() else None
            if answer is not None:
                return answer
            print("  (an empty or unrecognised answer; try again)", file=stdout)


if __name__ == "__main__":  # not a step: `python human.py --help` shows how to play
    print(__doc__)
