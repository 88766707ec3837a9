"""The models behind the roles: one spec string per role (specs.py), and the pool that gives each role its model.

Every role's model, whatever plays it, is a `Chat`: the one `generate` every step calls. Behind it:
    local_models.py   a local model (embedded, hf:...): LocalChat, on a LocalLM that roles naming it share
    server.py         a model on an OpenAI-compatible server (openai:...): OpenAIChat
    scripted.py       the toy preset's scripted Oracle, Roleplayer and Judge (scripted:<folder>): ScriptedChat
    human.py          a person at the terminal as the Roleplayer or the Judge (human): HumanChat
Roles that name the same local model share one loaded copy (a `ModelPool`), so a 7B Questioner and
Roleplayer fit one GPU: LoRA adapters are attached by name and switched off for roles that need the base.
A Questioner on a server (`openai:<base model>`) asks as the server's model named for its adapter, and Q_BASE
scores there too (`server.ServerScorer`, with our own tokenizer: --tokenizer); docs/CLUSTER.md shows the commands.
How every step loads local models is one dataclass, `ModelSettings`, parsed beside each step's own Args.
"""

import dataclasses
import hashlib
import json
import threading
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

from chat_format import template_accepts_system
from human import HumanChat
from local_models import BATCH_TOKENS, LocalChat, LocalLM, load_tokenizer
from scripted import ScriptedChat
from server import OpenAIChat, ServerScorer, serve_adapter
from specs import parse_spec
from utils import StepError, append_jsonl, read_partial


class Chat(Protocol):
    """A role's model as every step sees it: one reply per prompt (a list of {"role", "content"} messages).
    Sampling is seeded (seed, or one seed per batch of batch_size prompts; a server seeds each request); desc
    names a progress bar. LocalChat, OpenAIChat, ScriptedChat, HumanChat and CachedChat follow it."""

    name: str

    def generate(self, prompts: list[list[dict]], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, batch_size: int = 16, desc: str | None = None) -> list[str]: ...


@dataclasses.dataclass
class ModelSettings:
    """How local models are loaded: the same flags in every step (parsed beside the step's own Args)."""

    _argument_group_name = "model settings (the same in every step)"
    cache_dir: str = dataclasses.field(default="cache", metadata={
        "help": "where the embedded model is cached, and the Oracle's (01) and the Judge's (05) call caches"})
    load_in_4bit: str = dataclasses.field(default="auto", metadata={
        "help": "4-bit NF4 local models (04: the QLoRA base): auto (on a CUDA GPU, for models of 3B parameters or "
                "more), yes, no", "choices": ["auto", "yes", "no"]})
    dtype: str = dataclasses.field(default="auto", metadata={
        "help": "what local models compute in (unquantized weights, 4-bit weights' compute dtype, 04's mixed "
                "precision): auto (on a GPU bfloat16 from compute capability 8.0, float16 below; on a CPU bfloat16 "
                "with native bf16 matmuls or 4-bit weights, else float32), bfloat16, float16, float32",
        "choices": ["auto", "bfloat16", "float16", "float32"]})
    trust_remote_code: bool = dataclasses.field(default=False, metadata={
        "help": "allow custom model code from the hub"})
    batch_tokens: int = dataclasses.field(default=BATCH_TOKENS, metadata={
        "help": "most tokens in one batch of a local model, counted as rows x the longest row (prompt + new "
                "tokens): a long prompt runs in a smaller batch, alone if need be, so this bounds the peak memory "
                "of generation and scoring; 0: no bound (only the steps' --batch_size)"})
    tokenizer: str = dataclasses.field(default="", metadata={
        "help": "with a Questioner on a server (openai:...): the spec of the model it serves ('embedded' or "
                "'hf:<hub id or path>'), whose tokenizer (and context length) Q_BASE scoring uses, so that the "
                "server scores exactly the tokens a local model would"})

    def pool(self) -> "ModelPool":
        """The ModelPool that loads each role's local model with these settings."""
        return ModelPool(self.cache_dir, self.load_in_4bit, self.trust_remote_code, self.dtype, self.batch_tokens,
                         self.tokenizer)


class ModelPool:
    """Loads each local model once, however many roles name it."""

    def __init__(self, cache_dir="cache", load_in_4bit="no", trust_remote_code=False, dtype="auto",
                 batch_tokens=BATCH_TOKENS, tokenizer=""):
        self.cache_dir, self.load_in_4bit, self.trust_remote_code = cache_dir, load_in_4bit, trust_remote_code
        self.dtype, self.batch_tokens, self.tokenizer = dtype, batch_tokens, tokenizer
        self.loaded, self.served = {}, None

    def local(self, spec) -> LocalLM:
        if spec not in self.loaded:
            self.loaded[spec] = LocalLM(spec, self.cache_dir, self.load_in_4bit, self.trust_remote_code, self.dtype,
                                        batch_tokens=self.batch_tokens)
        return self.loaded[spec]

    def served_tokenizer(self):
        """(tokenizer, context length) of --tokenizer (the served Questioner's model), loaded once for the
        Questioner's messages and Q_BASE's scoring alike."""
        if self.served is None:
            self.served = load_tokenizer(self.tokenizer, self.cache_dir, self.trust_remote_code)
        return self.served

    def scorer(self, spec):
        """What scores with the model `spec` (no adapter): the local model, or for 'openai:' the ServerScorer,
        which tokenizes with --tokenizer and caches its calls in <cache_dir>/scorer_calls.jsonl."""
        if parse_spec(spec)[0] != "openai":
            return self.local(spec)
        if not self.tokenizer:
            raise StepError(f"scoring with {spec!r} needs our tokenizer: pass --tokenizer with the spec of the model "
                            "the server serves ('embedded' or 'hf:<hub id or path>')")
        if spec not in self.loaded:
            self.loaded[spec] = ServerScorer(spec, *self.served_tokenizer(), self.cache_dir)
        return self.loaded[spec]

    def chat(self, spec, adapter=None, call_cache=None, questioner=False) -> Chat:
        """A role's chat model. adapter: (name, path) to generate with a LoRA adapter attached; on a server,
        the server answers as base + adapter under the adapter's served name (server.serve_adapter).
        questioner: the role is the Questioner, whose server serves the model --tokenizer names: its messages reach
        the server shaped for that model's chat template as they would be locally (OpenAIChat)."""
        kind, name, base_url = parse_spec(spec)
        if kind == "openai":
            system_ok = template_accepts_system(self.served_tokenizer()[0]) if questioner and self.tokenizer else True
            model = OpenAIChat(name, base_url, system_ok=system_ok)
            if adapter is not None:
                with model.errors():
                    model = OpenAIChat(serve_adapter(model.client, *adapter), base_url, system_ok=system_ok)
        elif kind == "scripted":  # the toy preset's roles; the sentence encoder loads on first use
            if spec not in self.loaded:
                self.loaded[spec] = ScriptedChat(name)
            model = self.loaded[spec]
        elif kind == "human":
            model = HumanChat()
        else:
            lm = self.local(spec)
            if adapter is not None:
                lm.add_adapter(*adapter)
            model = LocalChat(lm, adapter[0] if adapter else None)
        return CachedChat(model, call_cache) if call_cache else model


class CachedChat:
    """Remembers every completed call on disk (append + flush), keyed by model, prompt and settings.

    Used for the Oracle and the Judge: a rerun, or a crash halfway, never pays for the same call twice (nor asks
    a person playing the Judge the same question twice).
    """

    def __init__(self, inner, path):
        self.inner, self.path, self.name = inner, Path(path), inner.name
        self.done = {r["key"]: r["output"] for r in read_partial(self.path, None)} if self.path.exists() else {}
        self.lock = threading.Lock()

    def key(self, prompt, settings, seed):
        model_id = getattr(self.inner, "cache_id", self.name)
        return hashlib.sha256(json.dumps([model_id, prompt, settings, seed]).encode()).hexdigest()

    def generate(self, prompts, max_new_tokens=128, temperature=0.0, top_p=1.0, seed=0, batch_size=16,
                 desc=None):
        settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        keys = [self.key(p, settings, seed + i) for i, p in enumerate(prompts)]
        todo = [i for i, k in enumerate(keys) if k not in self.done]
        if todo:
            def remember(results):  # [(j, text)]: written in one append, so a batch is cached whole or not at all
                with self.lock:
                    for j, text in results:
                        self.done[keys[todo[j]]] = text
                    append_jsonl(self.path, [{"key": keys[todo[j]], "output": text} for j, text in results])

            self._generate([prompts[i] for i in todo], settings, [seed + i for i in todo], batch_size, desc, remember)
        return [self.done[k] for k in keys]

    def _generate(self, prompts, settings, seeds, batch_size, desc, remember):
        if isinstance(self.inner, (OpenAIChat, HumanChat)):  # per-request seeds; each result cached as it arrives
            self.inner.generate(prompts, seeds=seeds, desc=desc, on_result=lambda j, text: remember([(j, text)]),
                                **settings)
            return
        # Local models: one call per batch (seeded by its first request), cached as each batch ends. The
        # batches are the same on a rerun (cached batches are whole), so a resumed run samples the same text.
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False, disable=desc is None):
            texts = self.inner.generate(prompts[start:start + batch_size], seed=seeds[start],
                                        batch_size=batch_size, **settings)
            remember(list(enumerate(texts, start=start)))


def truncated(chat, prompts, max_new_tokens: int) -> list[bool]:
    """Which prompts a role's model cut to fit its context when it generated from them (LocalLM.truncated).
    Only local models cut; a server refuses a prompt that does not fit (OpenAIChat: a clear error)."""
    inner = chat.inner if isinstance(chat, CachedChat) else chat
    if isinstance(inner, LocalChat):
        return inner.lm.truncated(prompts, max_new_tokens)
    return [False] * len(prompts)
