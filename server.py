"""Models on an OpenAI-compatible server: a role played there (OpenAIChat, with the client's errors made clear), and
Q_BASE's scores computed there (ServerScorer, with our own tokenizer: --tokenizer, and a cache on disk); then the
requests that go beyond chat: serving a LoRA adapter by name, and reading the log-probs of a prompt's tokens.
Everything here that is specific to one server is in this file; docs/CLUSTER.md shows the commands.

Two servers are covered (docs/CLUSTER.md says which parts were tested on which):
    vLLM                       LoRA adapters registered at run time, token-id prompts, `prompt_logprobs`
    llama.cpp's Python server  adapters named in its --config_file, text prompts, `echo` + `logprobs`
"""

import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import threading
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from chat_format import encode_chat, fit_scored, normalise_messages, template_accepts_system
from specs import parse_spec
from utils import StepError, append_jsonl, read_partial


# --- A role on a server -------------------------------------------------------------------------------

class OpenAIChat:
    """A role played by a model behind an OpenAI-compatible chat API.

    The messages reach the server as they reach a local model's chat template (normalise_messages: turns of one
    role in a row merged, and the system message folded into the first user turn when system_ok is False), so a
    role played on a server sees exactly the turns it would see locally; the server applies its template to them.
    The openai client retries 429 (honouring Retry-After), 5xx, timeouts and dropped connections with
    exponential backoff; permanent errors (bad key, unknown model) fail at once with a clear message.
    """

    def __init__(self, model, base_url=None, timeout=120.0, max_retries=None, concurrency=8, system_ok=True):
        import openai

        key = os.environ.get("OPENAI_API_KEY")
        if not key:
            raise StepError(f"openai:{model} needs an API key in the environment variable OPENAI_API_KEY "
                            "(any non-empty value for a local server that checks none)")
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        retries = os.environ.get("STARGATE_MAX_RETRIES", "8") if max_retries is None else str(max_retries)
        if not retries.isdigit():
            raise StepError(f"STARGATE_MAX_RETRIES must be a whole number (got {retries!r})")
        retries = int(retries)
        self.client = openai.OpenAI(api_key=key, base_url=self.base_url, timeout=timeout, max_retries=retries)
        self.model, self.concurrency, self.name, self.system_ok = model, concurrency, f"openai:{model}", system_ok
        self.cache_id = f"{self.name}@{self.base_url}"  # the same model name on two servers is two models
        self.openai = openai

    def one(self, messages, max_new_tokens, temperature, top_p, seed):
        with self.errors(max_new_tokens):
            reply = self.client.chat.completions.create(
                model=self.model, messages=normalise_messages(messages, self.system_ok), max_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p, seed=seed)
        return reply.choices[0].message.content or ""

    @contextlib.contextmanager
    def errors(self, max_new_tokens=None):
        """Turn the openai client's errors (after its retries) into one clear StepError each."""
        openai = self.openai
        try:
            yield
        except openai.AuthenticationError:
            raise StepError(f"{self.base_url} rejected the API key in OPENAI_API_KEY (401)") from None
        except openai.NotFoundError:
            raise StepError(f"{self.base_url} does not know the model {self.model!r} (404)") from None
        except openai.APITimeoutError:
            raise StepError(f"{self.base_url} did not answer within {self.client.timeout} s, "
                            f"{self.client.max_retries + 1} times; is the server overloaded?") from None
        except openai.APIConnectionError:
            raise StepError(f"cannot reach the OpenAI-compatible server at {self.base_url} "
                            "(set OPENAI_BASE_URL or openai:<model>@<url>)") from None
        except openai.APIStatusError as error:
            # OpenAI, vLLM and llama.cpp refuse a request longer than the model's context with a 400
            # (code context_length_exceeded): nothing is cut on a server, so say which settings to change.
            if error.status_code == 400 and (error.code == "context_length_exceeded"
                                             or "context length" in str(error).lower()):
                detail = error.body.get("message") if isinstance(error.body, dict) else str(error)
                raise StepError(f"{self.base_url}: a prompt plus max_tokens={max_new_tokens} does not fit the context "
                                f"of {self.name} ({str(detail)[:200]}); lower the step's *_max_tokens setting or "
                                "give the server a longer context (llama.cpp --n_ctx, vLLM --max-model-len)") from None
            raise StepError(f"{self.base_url} answered {error.status_code}: {str(error)[:200]}") from None

    def generate(self, prompts, max_new_tokens=128, temperature=0.0, top_p=1.0, seed=0, batch_size=16,
                 desc=None, seeds=None, on_result=None):
        """Concurrent requests; request i is seeded with seeds[i] (default seed + i).
        on_result(i, text) fires as each request ends."""
        seeds = seeds or [seed + i for i in range(len(prompts))]
        return call_concurrently(self.one, [(p, max_new_tokens, temperature, top_p, s) for p, s in zip(prompts, seeds)],
                                 self.concurrency, desc, on_result)


def call_concurrently(call, jobs: list[tuple], concurrency: int, desc=None, on_result=None) -> list:
    """[call(*job) for job in jobs], run on `concurrency` threads; on_result(i, result) fires as job i ends.
    After a failure no new job starts, the answers that still arrive are kept (on_result: they are paid for),
    and then the first error is raised."""
    outputs, errors = [None] * len(jobs), []
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures = {pool.submit(call, *job): i for i, job in enumerate(jobs)}
        for future in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc=desc,
                           leave=False, disable=desc is None):
            if future.cancelled():
                continue
            if future.exception() is not None:  # stop sending, but keep what is already paid for
                errors.append(future.exception())
                for other in futures:
                    other.cancel()
                continue
            i = futures[future]
            outputs[i] = future.result()
            if on_result:
                on_result(i, outputs[i])
    if errors:
        raise errors[0]
    return outputs


# --- Q_BASE's scores on a server ----------------------------------------------------------------------

class ServerScorer:
    """Q_BASE's score of a response (LocalLM.score) computed by an OpenAI-compatible server.

    The prompt and response are encoded by OUR tokenizer and chat template (encode_chat) and cut to fit as
    LocalLM cuts them (fit_scored; one token short of the context, for the one token the server generates), so the
    server scores exactly the tokens local scoring would (at a context one token longer); the server
    returns each prompt token's log-prob (server.scoring_request) and the response's are summed. vLLM takes the
    token ids; llama.cpp's Python server takes text only (its prompt is a string), so it gets the text of our ids
    and the tokens it echoes are compared with ours. Every call is cached on disk, keyed by the server's model
    and the token ids, and retried as the other openai: calls are (OpenAIChat).
    """

    def __init__(self, spec, tokenizer, context_length: int | None, cache_dir="cache", concurrency=8):
        """tokenizer, context_length: of the model the server serves (local_models.load_tokenizer: --tokenizer)."""
        _, name, base_url = parse_spec(spec)
        self.tokenizer, self.context_length = tokenizer, context_length
        self.server = OpenAIChat(name, base_url)
        self.spec, self.system_ok, self.concurrency = spec, template_accepts_system(self.tokenizer), concurrency
        self.token_ids = None  # whether the server takes prompts as token ids (asked before the first request)
        self.path = Path(cache_dir) / "scorer_calls.jsonl"
        self.done = {r["key"]: r["logprob"] for r in read_partial(self.path, None)} if self.path.exists() else {}
        self.lock = threading.Lock()

    def score(self, prompts, responses, adapter=None, batch_size=8, desc=None):
        """(logprob, n_tokens, truncated) of each response after its prompt, as LocalLM.score returns them."""
        if adapter is not None:
            raise StepError("a server scores with the base model only (Q_BASE)")
        # The server generates one token after the prompt (scoring_request), which must fit the context too.
        room = self.context_length - 1 if self.context_length else None
        pairs = [fit_scored(*encode_chat(self.tokenizer, p, r, self.system_ok), room)
                 for p, r in zip(prompts, responses)]
        keys = [hashlib.sha256(json.dumps([self.server.cache_id, p, r]).encode()).hexdigest() for p, r, _ in pairs]
        todo = list({k: i for i, k in enumerate(keys) if k not in self.done}.values())  # each new call once
        if todo and self.token_ids is None:
            with self.server.errors():
                self.token_ids = takes_token_ids(self.server.client)
            if self.token_ids and prefix_caching_on(self.server.client):
                raise StepError(f"{self.server.base_url} caches prompt prefixes, and then a prompt's log-probs can "
                                "depend on the requests scored before it (vLLM issue 42019): restart vLLM with "
                                "--no-enable-prefix-caching to score there (docs/CLUSTER.md)")
        call_concurrently(self.one, [pairs[i][:2] for i in todo], self.concurrency, desc,
                          on_result=lambda j, logprob: self.remember(keys[todo[j]], logprob))
        return [(self.done[k], len(r), cut) for k, (_, r, cut) in zip(keys, pairs)]

    def remember(self, key, logprob):
        with self.lock:
            self.done[key] = logprob
            append_jsonl(self.path, [{"key": key, "logprob": logprob}])

    def one(self, prompt_ids, response_ids) -> float:
        """The summed log-prob of response_ids after prompt_ids, from one request."""
        ids = prompt_ids + response_ids
        if not self.token_ids and ids[0] != self.tokenizer.bos_token_id:
            # llama-cpp-python pairs the echoed token i with the log-probs computed after token i, and shifts them
            # back into place by dropping the first token only when it is BOS: otherwise every value is one off.
            raise StepError(f"{self.server.base_url} takes text prompts (llama.cpp), whose echoed log-probs are right "
                            "only for prompts that begin with the BOS token, and this chat template's do not; "
                            "score on vLLM, or locally")
        with self.server.errors(1):
            reply = self.request(ids if self.token_ids else self.tokenizer.decode(ids))
        logprobs, texts = prompt_tail(reply, ids, len(response_ids))
        if texts is not None:
            self.check_tokens(response_ids, texts)
        return float(sum(logprobs))

    def request(self, prompt) -> dict:
        body = scoring_request(prompt)
        extra = {"prompt_logprobs": body.pop("prompt_logprobs")} if "prompt_logprobs" in body else None  # vLLM's own
        return self.server.client.completions.create(model=self.server.model, **body, extra_body=extra).model_dump()

    def check_tokens(self, ids, texts):
        """The server tokenized our text as our tokenizer did: each scored token reads the same. Special tokens
        (llama.cpp writes them as '') and pieces of a multi-byte character are not compared."""
        special = set(self.tokenizer.all_special_ids)
        for token, text in zip(ids, texts):
            ours = self.tokenizer.decode([token])
            if token not in special and "\ufffd" not in ours and text != ours:
                raise StepError(f"{self.server.base_url} tokenizes differently from --tokenizer: it read {text!r} "
                                f"where ours has {ours!r}; set --tokenizer to the model the server serves")


# --- Requests beyond chat: adapters by name, prompt log-probs -----------------------------------------


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
