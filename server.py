"""The requests to an OpenAI-compatible server that go beyond chat: serving a LoRA adapter by name, and reading the
log-probs of a prompt's tokens. Everything here that is specific to one server is in this file.

Two servers are covered (docs/CLUSTER.md says which parts were tested on which):
    vLLM                       LoRA adapters registered at run time, token-id prompts, `prompt_logprobs`
    llama.cpp's Python server  adapters named in its --config_file, text prompts, `echo` + `logprobs`
Plumbing only: the caller (models.ServerScorer, ModelPool.chat) owns the tokenizer, the cache and the retries.
"""

import hashlib
import json
from pathlib import Path

from utils import StepError


def adapter_served_name(name: str, path) -> str:
    """The model name under which a server serves the adapter `name` (e.g. "m1") read from folder `path`.

    The folder's absolute path is part of it: two runs on one server both have an "m1", and a server keeps
    every adapter it has loaded, so a bare "m1" would answer with the other run's Questioner."""
    digest = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


def check_adapter_servable(path):
    """vLLM serves LoRA weights only: an adapter with modules_to_save (full copies of, e.g., lm_head) is refused.
    04_train.py trains LoRA on all linear layers and saves no such modules; an adapter made elsewhere might."""
    config = Path(path) / "adapter_config.json"
    if not config.exists():
        raise StepError(f"{path}: no LoRA adapter here (adapter_config.json missing); "
                        "has 04_train.py finished for this iteration?")
    if json.loads(config.read_text()).get("modules_to_save"):
        raise StepError(f"{config}: the adapter has modules_to_save, which vLLM cannot serve; "
                        "train it without modules_to_save (04_train.py does)")


def serve_adapter(client, name: str, path) -> str:
    """Make a server answer as base + adapter; returns the model name to request. client: an openai.OpenAI.

    GET /v1/models lists what the server answers to ({"data": [{"id": name, ...}]}): llama.cpp's Python server
    lists the model_alias of each model in its --config_file, vLLM its base model, the --lora-modules it started
    with and the adapters loaded since. When the name is missing, ask vLLM to load it:
        POST /v1/load_lora_adapter  {"lora_name": name, "lora_path": folder}  -> 200 "Success: LoRA adapter ..."
    which vLLM offers only when started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (else 404
    "Not Found"); it answers 404 "No adapter found ..." when it cannot read the folder (a path on the server's
    machine) and 400 for the rest (LoRA off, a rank above --max-lora-rank, ...).
    """
    import openai

    check_adapter_servable(path)
    served = adapter_served_name(name, path)
    if served in {model.id for model in client.models.list().data}:
        return served
    folder = str(Path(path).resolve())
    try:
        client.post("/load_lora_adapter", body={"lora_name": served, "lora_path": folder}, cast_to=str)
    except openai.NotFoundError as error:
        if "no adapter found" in str(error).lower():
            raise StepError(f"{client.base_url} cannot read the adapter folder {folder} (404: {str(error)[:200]}); "
                            "the server must see that same path (the same machine, or a shared file system)") from None
        raise StepError(f"{client.base_url} cannot load LoRA adapters at run time (POST /v1/load_lora_adapter: 404) "
                        f"and does not list {served!r} in /v1/models: start vLLM with --enable-lora and "
                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or serve the adapter under that name") from None
    except openai.BadRequestError as error:
        raise StepError(f"{client.base_url} refused to load the adapter {folder} as {served!r} (400: "
                        f"{str(error)[:300]}); the server must run with --enable-lora and --max-lora-rank at least "
                        "the adapter's rank, and read the folder at that same path") from None
    return served


# Servers known to take a prompt as token ids, by the "owned_by" of the models GET /v1/models lists (vLLM's
# ModelCard: owned_by "vllm"; SGLang's: "sglang"). llama-cpp-python's request schema takes text only (prompt:
# str | list[str]; it answers 500 to a list of ids) and owns its models as "me".
TOKEN_ID_SERVERS = {"vllm", "sglang"}


def takes_token_ids(client) -> bool:
    """Whether the server behind client (an openai.OpenAI) takes prompts as token ids (TOKEN_ID_SERVERS)."""
    return any(getattr(model, "owned_by", None) in TOKEN_ID_SERVERS for model in client.models.list().data)


def scoring_request(prompt) -> dict:
    """The body of POST /v1/completions that returns the log-prob of every prompt token; one token is generated
    (max_tokens 0 would mean "up to the context" on llama.cpp).

    prompt: our token ids, for a server that takes them (vLLM), or their text (llama.cpp's Python server):
        vLLM       {"prompt": [ids], "prompt_logprobs": 0}
                   -> choices[0].prompt_logprobs: one entry per prompt token, None for the first, else
                      {"<token id>": {"logprob", "rank", "decoded_token"}} (0: only the prompt's own token)
        llama.cpp  {"prompt": "text", "echo": true, "logprobs": 0}  (the server needs logits_all, its default)
                   -> choices[0].logprobs: {"tokens": [text of each token], "token_logprobs": [None, ...]}:
                      the prompt's tokens then the generated one, leaving out every token whose id is BOS
    """
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0.0}
    return body | ({"prompt_logprobs": 0} if isinstance(prompt, list) else {"echo": True, "logprobs": 0})


def prompt_tail(reply: dict, prompt_ids: list[int], n_tail: int) -> tuple[list[float], list[str] | None]:
    """The log-probs of the last n_tail tokens of prompt_ids, from a reply (JSON) to scoring_request.

    Returns (logprobs, texts): texts are the server's text of each of those tokens when it read a text prompt
    (llama.cpp), for the caller to compare with its tokenizer's, else None (vLLM: the ids are checked here).
    Raises StepError when the reply has no prompt log-probs or its tokens are not ours."""
    n_prompt, choice, usage = len(prompt_ids), reply["choices"][0], reply.get("usage") or {}
    if usage.get("prompt_tokens") not in (None, n_prompt):
        raise StepError(f"the server read {usage['prompt_tokens']} prompt tokens where our tokenizer wrote "
                        f"{n_prompt}: it does not tokenize as ours (set --tokenizer to the model the server serves)")
    entries = choice.get("prompt_logprobs")
    if entries:  # vLLM
        if len(entries) != n_prompt:
            raise StepError(f"the server returned {len(entries)} prompt log-probs for a prompt of {n_prompt} tokens")
        tail = list(zip(prompt_ids[n_prompt - n_tail:], entries[n_prompt - n_tail:]))
        if any(not entry or str(token) not in entry for token, entry in tail):
            raise StepError("the server's prompt log-probs are for other token ids than ours: it does not use our "
                            "tokenizer's vocabulary (set --tokenizer to the model the server serves)")
        return [entry[str(token)]["logprob"] for token, entry in tail], None
    logprobs = choice.get("logprobs") or {}
    values, texts = logprobs.get("token_logprobs"), logprobs.get("tokens")
    if not values or not texts:
        raise StepError("the server returned no prompt log-probs (vLLM: prompt_logprobs; llama.cpp's Python server: "
                        "echo with logprobs, which needs --logits_all true)")
    end = len(values) - usage.get("completion_tokens", 1)  # the generated token comes after the prompt
    if end - n_tail < 1:
        raise StepError(f"the server echoed {end} prompt tokens, fewer than the {n_tail} to score")
    return values[end - n_tail:end], texts[end - n_tail:end]
