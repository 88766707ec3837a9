"""The requests to an OpenAI-compatible server that go beyond chat: serving a LoRA adapter by name, and reading the
log-probs of a prompt's tokens. Everything here that is specific to one server is in this file.

Two servers are covered (docs/CLUSTER.md says which parts were tested on which):
    vLLM                       LoRA adapters registered at run time, token-id prompts, `prompt_logprobs`
    llama.cpp's Python server  adapters named in its --config_file, text prompts, `echo` + `logprobs`
Plumbing only: the caller (models.ServerScorer, ModelPool.chat) owns the tokenizer, the cache and the retries.
"""

import hashlib
import json
import re
import urllib.request
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
    machine) and 400 or, in newer versions, 500 for the rest (LoRA off, a rank above --max-lora-rank, ...). The
    request is sent once: a failed load fails again, and the client's retries of a 5xx would only add a minute.
    """
    import openai

    check_adapter_servable(path)
    served = adapter_served_name(name, path)
    if served in {model.id for model in client.models.list().data}:
        return served
    folder = str(Path(path).resolve())
    try:
        client.with_options(max_retries=0).post("/load_lora_adapter", body={"lora_name": served, "lora_path": folder},
                                                cast_to=str)
    except openai.NotFoundError as error:
        if "no adapter found" in str(error).lower():
            raise StepError(f"{client.base_url} cannot read the adapter folder {folder} (404: {str(error)[:200]}); "
                            "the server must see that same path (the same machine, or a shared file system)") from None
        raise StepError(f"{client.base_url} cannot load LoRA adapters at run time (POST /v1/load_lora_adapter: 404) "
                        f"and does not list {served!r} in /v1/models: start vLLM with --enable-lora and "
                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or serve the adapter under that name") from None
    except openai.APIStatusError as error:  # 400, or 500 from newer vLLM versions
        raise StepError(f"{client.base_url} refused to load the adapter {folder} as {served!r} ({error.status_code}: "
                        f"{error_message(error)[:300]}); the server must run with --enable-lora and --max-lora-rank at "
                        "least the adapter's rank, and read the folder at that same path") from None
    return served


def error_message(error) -> str:
    """The server's own message in an openai.APIStatusError (vLLM: {"error": {"message": ...}}), else its text."""
    body = error.body.get("error", error.body) if isinstance(error.body, dict) else None
    return str(body.get("message", body)) if isinstance(body, dict) else str(error)


# Servers known to take a prompt as token ids, by the "owned_by" of the models GET /v1/models lists (vLLM's
# ModelCard: owned_by "vllm"; SGLang's: "sglang"). llama-cpp-python's request schema takes text only (prompt:
# str | list[str]; it answers 500 to a list of ids) and owns its models as "me".
TOKEN_ID_SERVERS = {"vllm", "sglang"}


def takes_token_ids(client) -> bool:
    """Whether the server behind client (an openai.OpenAI) takes prompts as token ids (TOKEN_ID_SERVERS)."""
    return any(getattr(model, "owned_by", None) in TOKEN_ID_SERVERS for model in client.models.list().data)


def scoring_request(prompt) -> dict:
    """The body of POST /v1/completions that returns the log-prob of every prompt token; one token is generated
    (max_tokens 0 would mean "up to the context" on llama.cpp), so prompt and that token must fit the context.

    prompt: our token ids, for a server that takes them (vLLM), or their text (llama.cpp's Python server):
        vLLM       {"prompt": [ids], "prompt_logprobs": 1}
                   -> choices[0].prompt_logprobs: one entry per prompt token, None for the first, else
                      {"<token id>": {"logprob", "rank", "decoded_token"}}: the prompt's own token and the
                      likeliest one (0 would ask for the prompt's token only, but early V1 versions then returned
                      no prompt log-probs at all: `[] if num_prompt_logprobs else None`)
        llama.cpp  {"prompt": "text", "echo": true, "logprobs": 0}  (the server needs logits_all, its default)
                   -> choices[0].logprobs: {"tokens": [text of each token], "token_logprobs": [None, ...]}:
                      the prompt's tokens then the generated one, leaving out every token whose id is BOS
    """
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0.0}
    return body | ({"prompt_logprobs": 1} if isinstance(prompt, list) else {"echo": True, "logprobs": 0})


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


def prefix_caching_on(client) -> bool | None:
    """Whether a vLLM server caches prompt prefixes (V1's default), read from its Prometheus metrics: GET /metrics
    has a line `vllm:cache_config_info{...,enable_prefix_caching="True",...} 1.0` (the labels are its CacheConfig).
    None when the server does not say (no /metrics, as llama.cpp's Python server; metrics off; another format).

    With prefix caching on, a prompt's log-probs can depend on the requests scored before it (vLLM issue 42019,
    open), and the scorer sends overlapping prompts concurrently: its sums would not be a function of the prompt."""
    url = re.sub(r"/v1/?$", "", str(client.base_url).rstrip("/")) + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode(errors="replace")
    except OSError:  # urllib's HTTPError and URLError too: no /metrics here
        return None
    found = re.search(r'^vllm:cache_config_info\{[^}]*enable_prefix_caching="(\w+)"', text, re.MULTILINE)
    return None if found is None else found[1] == "True"
