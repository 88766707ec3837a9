"""Chat templates and contexts: a conversation to the token ids a model sees, the labels it is trained on, and
cutting what does not fit its context. Shared by local models (local_models.py), served ones (server.py: the
Questioner's messages and Q_BASE's scoring shaped as locally) and training (04_train.py).
"""

import os

from utils import StepError


def template_accepts_system(tokenizer) -> bool:
    """Some chat templates (Mistral-Instruct's) reject a system message or silently drop it."""
    probe = [{"role": "system", "content": "SYSTEM-PROBE"}, {"role": "user", "content": "hi"}]
    try:
        return "SYSTEM-PROBE" in tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # jinja raises its own TemplateError via raise_exception()
        return False


def normalise_messages(messages, system_ok: bool):
    """Fold a system message into the first user turn when the template has no system role, and merge
    consecutive turns of the same role (e.g. the Roleplayer's last answer and the restated task)."""
    messages = [dict(m) for m in messages]  # a "train" flag, if present, is kept (and OR-ed when merged)
    if messages and messages[0]["role"] == "system" and not system_ok:
        system = messages.pop(0)["content"]
        messages[0]["content"] = f"{system}\n\n{messages[0]['content']}"
    merged = []
    for m in messages:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1]["content"] += "\n\n" + m["content"]
            merged[-1]["train"] = merged[-1].get("train", False) or m.get("train", False)
        else:
            merged.append(m)
    return merged


def encode_chat(tokenizer, messages, response: str | None = None, system_ok: bool = True):
    """Token ids of a chat prompt (ending with the assistant generation prompt) and, if given, of the
    assistant's response that follows it (its end-of-turn token included, template padding after it not).

    Prompt and response are tokenised separately and concatenated, so the boundary is exact for any
    template; this is the layout the model sees when it generates the response.
    """
    messages = normalise_messages(messages, system_ok)
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    if response is None:
        return prompt_ids, None
    full_text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                              tokenize=False)
    if not full_text.startswith(prompt_text):
        raise StepError("this chat template renders an assistant turn differently from its generation "
                        "prompt; cannot locate the response tokens")
    response_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    return prompt_ids, response_ids[:end_of_turn(tokenizer, response_ids)]


def end_of_turn(tokenizer, response_ids) -> int:
    """Length of a rendered assistant turn without the whitespace some templates write after its
    end-of-turn token (ChatML's "<|im_end|>\n", Gemma's "<end_of_turn>\n"): that is layout, not reply."""
    keep = len(response_ids)
    while keep > 0 and not tokenizer.decode(response_ids[keep - 1:keep]).strip():
        keep -= 1
    return keep


def encode_for_training(tokenizer, messages, system_ok: bool = True):
    """(input_ids, labels) of a whole conversation; labels are -100 except on the assistant messages
    marked "train": true (their content and end-of-turn token), so system and user tokens carry no loss.

    The text is rendered up to each assistant turn and cut at the turn boundaries, so each trained span is
    tokenised exactly as encode_chat tokenises a response after its prompt.
    """
    plain = normalise_messages(messages, system_ok)
    ids, labels, done = [], [], ""
    for i, message in enumerate(plain):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(plain[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(plain[:i + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise StepError("this chat template re-renders earlier turns; cannot build training labels")
        prompt_ids = tokenizer(prompt[len(done):], add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
        keep = end_of_turn(tokenizer, response_ids)  # train up to the end-of-turn token, not the layout after it
        trained = response_ids[:keep] if message.get("train") else [-100] * keep
        ids += prompt_ids + response_ids
        labels += [-100] * len(prompt_ids) + trained + [-100] * (len(response_ids) - keep)
        done = full
    return ids, labels


def cut_middle(ids: list, room: int) -> list:
    """A token sequence shortened to `room` tokens by cutting out its middle (kept whole if it fits).

    For a chat prompt the head holds the instructions (system prompt, worked example) and the tail the
    latest turns and the generation prompt: what a model most needs to continue the dialogue.
    """
    if len(ids) <= room:
        return ids
    head = room // 2
    return ids[:head] + ids[len(ids) - (room - head):]


def fit_scored(prompt_ids, response_ids, context_length: int | None):
    """(prompt, response, truncated) within the context. The prompt loses its middle first; a response
    longer than half the context keeps only its head, and n_tokens then says how much was scored."""
    n = context_length
    if n is None or len(prompt_ids) + len(response_ids) <= n:
        return prompt_ids, response_ids, False
    prompt_ids = cut_middle(prompt_ids, max(n - len(response_ids), n // 2))
    return prompt_ids, response_ids[:n - len(prompt_ids)], True


def model_context(config) -> int | None:
    """The most positions a model was trained for (its config's max_position_embeddings), or the shorter
    STARGATE_CONTEXT_LENGTH; None if neither says."""
    limits = [n for n in (getattr(config, "max_position_embeddings", None), context_override()) if n]
    return min(limits) if limits else None


def context_override() -> int | None:
    """STARGATE_CONTEXT_LENGTH, if set: a context shorter than the model's (tests; less memory)."""
    value = os.environ.get("STARGATE_CONTEXT_LENGTH")
    if value is None:
        return None
    if not value.isdigit() or int(value) < 2:
        raise StepError(f"STARGATE_CONTEXT_LENGTH must be a whole number of tokens >= 2 (got {value!r})")
    return int(value)
