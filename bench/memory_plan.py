"""The memory plan: peak memory of generation, scoring and training for each preset of run_all.sh, computed
from the models' configs and the presets' batch and length settings (README, "Memory plan").

    python bench/memory_plan.py                          # the README table
    python bench/memory_plan.py --detail                 # every heavy call of every step, term by term
    python bench/memory_plan.py --measured results.json  # bench/gpu.py's measured peaks beside the plan

Every generated text is taken at its token cap and every prompt at its longest (the last turn of a
conversation of max_turns turns, personas at their cap, the longest task of data/tasks.jsonl), rendered by
roles.py's views and the model's chat template: an upper bound of what a step meets. A step's peak is its
heaviest call; the table shows, per preset, the heaviest generation, scoring and training call. In bytes,
with rows x tokens the call's batch and its longest sequence:

  weights      4-bit: each parameter that bitsandbytes quantizes (found by running transformers' own bnb
               quantizer on the model built on the meta device: the decoder's nn.Linear layers) at
               0.5 + 1/64 + 4/16384 bytes (NF4 codes; double quantization: one 8-bit absmax per block of 64,
               one fp32 per 256 blocks), every other parameter in bf16 (the checkpoint's dtype). Unquantized:
               every parameter in bf16 (what --dtype auto gives on a GPU, and on a CPU with bf16 matmuls).
               All models a step holds at once: the Questioner and a different Roleplayer (02, 05), and a
               small unquantized model's merged adapter copy (local_models.LocalLM.merged_copy: 02 from t = 1, 05).
  KV cache     rows x (prompt + new tokens) x layers x 2 x kv_heads x head_dim x 2: decoding.py preallocates
               it for the prefill plan's width plus the cap; scoring caches prompt + response. The plan's width
               (decoding.allocated_width) is the longest prompt for the identical-length prompts planned here,
               and --batch_tokens bounds rows x that width in the steps (local_models.LocalLM.batches).
  activations  inference: one layer's forward over every row's whole prompt at once (prefill; shared prefixes
               are prefilled once, which this ignores: an upper bound): rows x tokens x (3 x intermediate +
               6 x hidden) x 2 (the MLP's gate, up and product; residual, norm, attention in and out), the
               boolean attention mask rows x tokens x tokens, and under 4-bit one weight dequantized to bf16
               (hidden x intermediate x 2). Scoring adds the last hidden states (rows x tokens x hidden x 2) and
               score_batch's fp32 logits of up to 1024 positions (x 3: logits, log-sum-exp, gather).
  training     (04_train.py: QLoRA or LoRA on every linear layer, gradient checkpointing per decoder layer)
               weights: 4-bit as above, the other parameters in fp32 (prepare_model_for_kbit_training upcasts
               them); unquantized: all in bf16. LoRA: r x (in + out) per linear layer x 16 (fp32 weight,
               gradient, AdamW's two moments). Checkpoints: layers x rows x tokens x hidden x 4 (the residual
               stream, fp32 after that upcast; x 2 unquantized). One layer recomputed and back-propagated:
               rows x tokens x (A_F x intermediate + A_D x hidden + A_0) x 1.5; A_F, A_D, A_0 are the bytes
               autograd saves per token in one layer, counted with torch.autograd.graph.saved_tensors_hooks on
               a small Mistral layer on the CPU (4-bit, bf16 autocast, LoRA r 16 on every linear: 18.75,
               34.8, 484 with dropout 0.05; 14.75, 22.8, 484 without; bf16 weights, no autocast, no dropout:
               17.5, 63.4, 484); x 1.5 allows for the gradients in flight during that layer's backward (an
               estimate: bench/gpu.py measures). Without checkpointing every layer keeps what it saved.
               Logits at the labelled positions (04's labelled_loss): rows x labelled x vocab x 16 (bf16
               logits, their fp32 copy, log-softmax, fp32 and bf16 gradients).
"""

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from mistral_standin import MISTRAL_7B_INSTRUCT_V02, standin_tokenizer  # noqa: E402
from chat_format import encode_chat, encode_for_training, template_accepts_system  # noqa: E402
from local_models import BATCH_TOKENS, embedded_model_dir, token_batches  # noqa: E402
from roles import (JUDGE_PROMPT, JUDGE_SYSTEM, ORACLE_GOLD_PROMPT, ORACLE_SYSTEM, PERSONA_PROMPT,  # noqa: E402
                   answer_view, questioner_view, roleplayer_view)

GIB = 2 ** 30
TARGET_GIB = 12  # the laptop preset's target: fits a 16 GB consumer card with room to spare

# The models of the presets, as (transformers model type, config keyword arguments).
SMOL, MISTRAL, MIXTRAL = "SmolLM2-135M-Instruct", "Mistral-7B-Instruct-v0.2", "Mixtral-8x7B-Instruct-v0.1"
MODELS = {
    SMOL: ("llama", dict(  # the embedded model's config.json (cache/SmolLM2-135M-Instruct)
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True)),
    MISTRAL: ("mistral", MISTRAL_7B_INSTRUCT_V02),
    MIXTRAL: ("mixtral", dict(  # its config.json
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
        rope_theta=1e6, sliding_window=None, tie_word_embeddings=False)),
}


@dataclass(frozen=True)
class Preset:
    """The settings of one run_all.sh preset that size memory; defaults are the steps' own."""
    questioner: str
    roleplayer: str | None = None  # a second local model, held beside the Questioner in 02 and 05
    quantized: bool = True  # 4-bit NF4 (--load_in_4bit yes, or auto on a GPU)
    # Whether 01's Oracle, 05's Judge and the Roleplayer run on the Questioner's model (else an API or a script).
    local_oracle: bool = True
    local_judge: bool = True
    local_roleplayer: bool = True
    persona_max_tokens: int = 250  # 01
    gold_max_tokens: int = 300
    oracle_batch_size: int = 16
    question_max_tokens: int = 64  # 02
    answer_max_tokens: int = 96
    max_turns: int = 3
    simulate_batch_size: int = 32
    select_answer_max_tokens: int = 300  # 03
    select_batch_size: int = 16
    train_batch_size: int = 4  # 04
    max_length: int = 1024
    lora_r: int = 16
    lora_dropout: float = 0.05
    gradient_checkpointing: bool = True
    eval_question_max_tokens: int = 64  # 05
    eval_answer_max_tokens: int = 96
    final_max_tokens: int = 300
    judge_max_tokens: int = 200
    eval_batch_size: int = 32
    batch_tokens: int = BATCH_TOKENS  # every step: rows x longest row of a generation or scoring batch


# run_all.sh's presets (its flags over the steps' defaults; tests/test_memory.py checks they agree).
# tiny and toy run on a CPU: unquantized bf16 (--dtype auto there); laptop with a local Oracle and Judge
# (no OPENAI_API_KEY), the heavier case.
PRESETS = {
    "tiny": Preset(SMOL, quantized=False, batch_tokens=32768, persona_max_tokens=120, gold_max_tokens=96,
                   answer_max_tokens=48, select_answer_max_tokens=96, train_batch_size=1, lora_r=8,
                   lora_dropout=0.0, eval_answer_max_tokens=48, final_max_tokens=96, judge_max_tokens=64,
                   eval_batch_size=16),
    "toy": Preset(SMOL, quantized=False, batch_tokens=32768, local_oracle=False, local_judge=False,
                  local_roleplayer=False, question_max_tokens=24, select_answer_max_tokens=40, train_batch_size=1,
                  lora_r=8, lora_dropout=0.0, gradient_checkpointing=False, eval_question_max_tokens=24,
                  final_max_tokens=40),
    "laptop": Preset(MISTRAL, train_batch_size=4),
    "paper": Preset(MISTRAL, local_oracle=False, local_judge=False, local_roleplayer=False),  # Mixtral served
}

# Bytes autograd saves per token in one decoder layer (see the module docstring): (A_F, A_D, A_0) by
# (4-bit with bf16 autocast, LoRA dropout > 0). bf16 weights with dropout (no preset trains so) was not
# counted: taken as without.
SAVED_PER_TOKEN = {(True, True): (18.75, 34.8, 484), (True, False): (14.75, 22.8, 484),
                   (False, False): (17.5, 63.4, 484), (False, True): (17.5, 63.4, 484)}
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


def model_config(name_or_config):
    """A transformers config from a MODELS name, a (model type, kwargs) pair, or a config."""
    from transformers import AutoConfig

    if isinstance(name_or_config, str):
        name_or_config = MODELS[name_or_config]
    if isinstance(name_or_config, tuple):
        model_type, kwargs = name_or_config
        return AutoConfig.for_model(model_type, **kwargs)
    return name_or_config


def skeleton(config, quantized: bool):
    """The model built on the meta device (no memory), its linear layers replaced as a 4-bit load replaces them."""
    from transformers import AutoModelForCausalLM
    from transformers.quantizers import AutoHfQuantizer

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if quantized:
        AutoHfQuantizer.from_config(bnb_config(), pre_quantized=False).preprocess_model(model, device_map={"": "cpu"})
    return model


def bnb_config():
    """The 4-bit settings of local_models.load_local."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


@dataclass
class Shape:
    """What the formulas need of a model: parameter counts by kind, and the sizes of one layer."""
    quantized_params: int  # in 4-bit layers
    other_params: int
    lora_per_rank: int  # sum of (in + out) over the linear layers LoRA targets ("all-linear")
    layers: int
    hidden: int
    intermediate: int  # per token: x experts per token for a mixture of experts
    kv_per_token: int  # KV cache bytes per token (bf16)
    vocab: int

    @classmethod
    def of(cls, config, quantized: bool):
        import bitsandbytes as bnb

        model = skeleton(config, quantized)
        params = dict(model.named_parameters())  # tied weights once
        four = sum(p.numel() for p in params.values() if isinstance(p, bnb.nn.Params4bit))
        linear = (torch.nn.Linear, bnb.nn.Linear4bit)
        lora = sum(m.in_features + m.out_features for name, m in model.named_modules()
                   if isinstance(m, linear) and not name.endswith("lm_head"))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(four, sum(p.numel() for p in params.values()) - four, lora, config.num_hidden_layers,
                   config.hidden_size, config.intermediate_size * getattr(config, "num_experts_per_tok", 1),
                   2 * config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim, config.vocab_size)

    def weights(self, training=False) -> float:
        other = 4 if training and self.quantized_params else 2  # prepare_model_for_kbit_training: fp32
        return self.quantized_params * NF4_BYTES + self.other_params * other


def inference_activations(s: Shape, rows: int, tokens: int, quantized: bool) -> float:
    dequantized = 2 * s.hidden * s.intermediate if quantized else 0
    return rows * tokens * ((3 * s.intermediate + 6 * s.hidden) * 2 + tokens) + dequantized


def generation_terms(s: Shape, rows, prompt, new, quantized, weights) -> dict:
    """Bytes of one generate_batch call of `rows` prompts of `prompt` tokens, `new` tokens each."""
    return {"weights": weights, "kv": rows * (prompt + new) * s.kv_per_token,
            "activations": inference_activations(s, rows, prompt, quantized) + rows * s.vocab * 4 * 3}


def scoring_terms(s: Shape, rows, prompt, response, quantized, weights) -> dict:
    """Bytes of one score_batch call: prompts of `prompt` tokens, responses of `response` tokens."""
    tokens = prompt + response
    return {"weights": weights, "kv": rows * tokens * s.kv_per_token,
            "activations": inference_activations(s, rows, tokens, quantized) + rows * tokens * s.hidden * 2
            + min(1024, rows * response) * s.vocab * 4 * 3}


def training_terms(s: Shape, rows, tokens, labelled, lora_r, dropout, checkpointing, quantized) -> dict:
    """Bytes of one training step of 04_train.py on `rows` sequences of `tokens` tokens, `labelled` of them
    labelled (04's loss makes logits only there)."""
    a_f, a_d, a_0 = SAVED_PER_TOKEN[(quantized, dropout > 0)]
    per_layer = rows * tokens * (a_f * s.intermediate + a_d * s.hidden + a_0)
    residual = 4 if quantized else 2
    saved = (s.layers * rows * tokens * s.hidden * residual + per_layer * 1.5) if checkpointing \
        else s.layers * per_layer + per_layer * 0.5
    return {"weights": s.weights(training=True), "lora+optimizer": lora_r * s.lora_per_rank * 16,
            "activations": saved + rows * labelled * s.vocab * 16}


# --- The heaviest calls of each step, with prompts at their longest --------------------------------------

class Filler:
    """Stand-ins for generated texts at their caps: n tokens of English (this repository's tasks and persona
    sketches) from token `offset` on; different offsets give different texts (no shared prefix)."""

    def __init__(self, tokenizer):
        source = [json.loads(line) for name in ("tasks", "personas") for line in open(ROOT / "data" / f"{name}.jsonl")]
        self.tokenizer = tokenizer
        text = " ".join(r.get("text") or r.get("bio") for r in source)
        self.ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, n: int, offset: int = 0) -> str:
        start = offset % (len(self.ids) - n)
        return self.tokenizer.decode(self.ids[start:start + n]).strip()


def dialogue(fill: Filler, turns: int, question: int, answer: int, offset: int = 0, last_question=False) -> list:
    """A conversation of `turns` question-answer turns at the caps (plus a last question, if asked)."""
    messages = []
    for t in range(turns):
        messages += [{"role": "assistant", "content": fill(question, offset + 1000 * t)},
                     {"role": "user", "content": fill(answer, offset + 1000 * t + 500)}]
    if last_question:
        messages.append({"role": "assistant", "content": fill(question, offset + 1000 * turns)})
    return messages


def longest_task() -> str:
    return max((json.loads(line)["text"] for line in open(ROOT / "data" / "tasks.jsonl")), key=len)


def heavy_calls(p: Preset, tokenizer, rows_offset: int = 0) -> list[dict]:
    """The heaviest local calls of each step as run_all.sh runs them: for each, its kind (generate, score,
    train), batch, prompts (chat messages, one per row: rows differ in their dialogue) and token cap or response."""
    name, task, fill = "Maya", longest_task(), Filler(tokenizer)
    bio = fill(p.persona_max_tokens, 77)

    def rows(n, make):
        return [make(rows_offset + 211 * i) for i in range(n)]

    calls = []
    if p.local_oracle:
        sketches = "\n\n".join(json.loads(line)["bio"] for line in list(open(ROOT / "data" / "personas.jsonl"))[:3])
        calls += [
            dict(step="01 personas", kind="generate", new=p.persona_max_tokens, prompts=rows(
                p.oracle_batch_size, lambda o: [{"role": "system", "content": ORACLE_SYSTEM}, {
                    "role": "user", "content": PERSONA_PROMPT.format(examples=sketches, name=name)}])),
            dict(step="01 gold answers", kind="generate", new=p.gold_max_tokens, prompts=rows(
                p.oracle_batch_size, lambda o: [{"role": "system", "content": ORACLE_SYSTEM}, {
                    "role": "user", "content": ORACLE_GOLD_PROMPT.format(bio=fill(p.persona_max_tokens, o),
                                                                         task=task)}]))]
    for step, batch, question, answer in (
            ("02", p.simulate_batch_size, p.question_max_tokens, p.answer_max_tokens),
            ("05", p.eval_batch_size, p.eval_question_max_tokens, p.eval_answer_max_tokens)):
        last = p.max_turns - 1
        calls.append(dict(step=f"{step} questions, turn {p.max_turns}", kind="generate", new=question, prompts=rows(
            batch, lambda o: questioner_view(name, task, dialogue(fill, last, question, answer, o)))))
        if p.local_roleplayer:
            calls.append(dict(step=f"{step} answers, turn {p.max_turns}", kind="generate", new=answer, prompts=rows(
                batch, lambda o: roleplayer_view(bio, task, dialogue(fill, last, question, answer, o, True)))))
    for step, batch, cap in (("03", p.select_batch_size, p.select_answer_max_tokens),
                             ("05", p.eval_batch_size, p.final_max_tokens)):
        views = rows(batch, lambda o: answer_view(name, task, dialogue(
            fill, p.max_turns, p.question_max_tokens, p.answer_max_tokens, o)))
        calls.append(dict(step=f"{step} final answers", kind="generate", new=cap, prompts=views))
        calls.append(dict(step=f"{step} gold log-probs", kind="score", prompts=views,
                          responses=[fill(p.gold_max_tokens, 3000 + i) for i in range(batch)]))
    if p.local_judge:
        calls.append(dict(step="05 judge", kind="generate", new=p.judge_max_tokens, prompts=rows(
            p.eval_batch_size, lambda o: [{"role": "system", "content": JUDGE_SYSTEM}, {
                "role": "user", "content": JUDGE_PROMPT.format(
                    bio=bio, task=task, a=fill(p.final_max_tokens, o), b=fill(p.final_max_tokens, o + 99))}])))
    record = answer_view(name, task, dialogue(fill, p.max_turns, p.question_max_tokens, p.answer_max_tokens)) + [
        {"role": "assistant", "content": fill(p.select_answer_max_tokens, 4000)}]
    fixed = len(questioner_view(name, task, []))
    calls.append(dict(step="04 training step", kind="train", records=[[
        dict(m, train=i >= fixed and m["role"] == "assistant") for i, m in enumerate(record)]] * p.train_batch_size))
    return calls


def call_size(call, tokenizer, max_length: int) -> tuple[int, int, int]:
    """(rows, longest prompt or sequence, new or response tokens; for training, labelled positions) of a call,
    in the model's tokens."""
    system_ok = template_accepts_system(tokenizer)
    if call["kind"] == "train":
        rows = [encode_for_training(tokenizer, r, system_ok) for r in call["records"]]
        labelled = max(sum(label != -100 for label in labels[:max_length]) for _, labels in rows)
        return len(rows), min(max(len(ids) for ids, _ in rows), max_length), labelled
    if call["kind"] == "score":
        pairs = [encode_chat(tokenizer, p, r, system_ok) for p, r in zip(call["prompts"], call["responses"])]
        return len(pairs), max(len(p) for p, _ in pairs), max(len(r) for _, r in pairs)
    longest = max(len(encode_chat(tokenizer, p, None, system_ok)[0]) for p in call["prompts"])
    return len(call["prompts"]), longest, call["new"]


def tokenizer_of(model: str, cache_dir):
    """The model's tokenizer: the embedded one, or its Mistral stand-in for Mistral and Mixtral (same 32000-token
    vocabulary size, same [INST] template; 4% fewer tokens than Mistral's own on this project's text)."""
    from transformers import AutoTokenizer

    folder = embedded_model_dir(cache_dir)
    return AutoTokenizer.from_pretrained(folder) if model == SMOL else standin_tokenizer(folder)


def call_terms(call: dict, sizes: tuple, p: Preset, model: "Shape", held: float) -> dict:
    """The terms in bytes of one heavy call of sizes call_size(...), run by `model` while `held` bytes of weights
    are loaded (training loads the Questioner alone, as 04 does)."""
    n, tokens, new = sizes
    if call["kind"] == "generate":
        return generation_terms(model, n, tokens, new, p.quantized, held)
    if call["kind"] == "score":
        return scoring_terms(model, n, tokens, new, p.quantized, held)
    return training_terms(model, n, tokens, new, p.lora_r, p.lora_dropout, p.gradient_checkpointing, p.quantized)


def plan(p: Preset, cache_dir) -> list[dict]:
    """Each heavy call of the preset with its sizes and its terms in bytes."""
    tokenizer = tokenizer_of(p.questioner, cache_dir)
    q = Shape.of(model_config(p.questioner), p.quantized)
    r = Shape.of(model_config(p.roleplayer), p.quantized) if p.roleplayer else None
    # A small unquantized model generates with an adapter from a merged copy (02 from t = 1, 05).
    merged_copy = 0 if p.quantized or q.quantized_params + q.other_params > 1e9 else q.weights()
    rows = []
    for call in heavy_calls(p, tokenizer):
        sizes = call_size(call, tokenizer, p.max_length)
        if call["kind"] != "train":  # the token budget splits a batch of long rows: its first batch is the peak
            n, length = sizes[0], sizes[1] + sizes[2]
            sizes = (len(token_batches(list(range(n)), [length] * n, n, p.batch_tokens)[0]), *sizes[1:])
        simulating = call["step"][:2] in ("02", "05")
        held = q.weights() + (r.weights() if r and simulating else 0) + (merged_copy if simulating else 0)
        terms = call_terms(call, sizes, p, r if r and "answers, turn" in call["step"] else q, held)
        rows.append(dict(step=call["step"], kind=call["kind"], rows=sizes[0], tokens=sizes[1], new=sizes[2],
                         terms=terms, total=sum(terms.values())))
    return rows


def gib(x) -> str:
    return f"{x / GIB:.2f}"


def size(call) -> str:
    """rows x tokens, + new (generation) or response tokens (scoring), or the labelled positions (training)."""
    extra = {"generate": f" + {call['new']}", "score": f" + {call['new']}", "train": f", {call['new']} labelled"}
    return f"{call['rows']} x {call['tokens']}{extra[call['kind']]}"


def table(plans: dict, measured: dict) -> str:
    """The README table: per preset, the heaviest generation, scoring and training call."""
    lines = ["| preset | weights (held) | generation: planned peak (heaviest call) | scoring | training step "
             "| measured |",
             "|---|---|---|---|---|---|"]
    for name, rows in plans.items():
        cells = []
        for kind in ("generate", "score", "train"):
            top = max((r for r in rows if r["kind"] == kind), key=lambda r: r["total"])
            cells.append(f"{gib(top['total'])} GiB ({top['step']}: {size(top)})")
        held = max(r["terms"]["weights"] for r in rows if r["kind"] != "train")
        lines.append(f"| {name} | {gib(held)} GiB | " + " | ".join(cells) + f" | {measured.get(name, '-')} |")
    return "\n".join(lines)


def detail(plans: dict) -> str:
    lines = ["| preset | call | rows x tokens | " + " | ".join(
        ["weights", "KV cache", "LoRA + optimizer", "activations", "peak"]) + " |", "|---|---|---|---|---|---|---|---|"]
    for name, rows in plans.items():
        for r in rows:
            t = r["terms"]
            terms = " | ".join(gib(t.get(k, 0)) for k in ("weights", "kv", "lora+optimizer", "activations"))
            lines.append(f"| {name} | {r['step']} | {size(r)} | {terms} | {gib(r['total'])} |")
    return "\n".join(lines)


def advice(plans: dict, batch: int = 16) -> list[str]:
    """For the laptop preset: the calls over the target, and their peak at a smaller batch."""
    notes = []
    for r in plans.get("laptop", []):
        if r["total"] <= TARGET_GIB * GIB or r["kind"] == "train":
            continue
        fixed = r["terms"]["weights"]  # the rest grows with the batch (but for a few MB)
        smaller = fixed + (r["total"] - fixed) * batch / r["rows"]
        fits = int((TARGET_GIB * GIB - fixed) // ((r["total"] - fixed) / r["rows"]))
        notes.append(f"laptop, {r['step']}: {gib(r['total'])} GiB at batch {r['rows']}, over {TARGET_GIB} GiB; "
                     f"with --batch_size {batch} for step {r['step'][:2]}: {gib(smaller)} GiB "
                     f"(at most {fits} rows fit)")
    return notes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--cache_dir", default=str(ROOT / "cache"), help="where the embedded model is cached")
    parser.add_argument("--detail", action="store_true", help="every heavy call, term by term")
    parser.add_argument("--measured", help="bench/gpu.py's results.json: its laptop peaks beside the plan")
    args = parser.parse_args()
    plans = {name: plan(PRESETS[name], args.cache_dir) for name in args.presets}
    measured = {"tiny": "CPU RSS 2.4-2.8 GB (docs/EXPERIMENTS.md)",
                "toy": "CPU RSS 3.1-3.5 GB (docs/EXPERIMENTS.md)"}
    if args.measured:
        results = json.loads(Path(args.measured).read_text())
        peaks = {}  # the Mistral-shaped model's highest measured peak per kind of call
        for r in results["rows"]:
            if r["model"].startswith("Mistral") and r.get("peak_allocated_gib"):
                peaks[r["kind"]] = max(peaks.get(r["kind"], 0), r["peak_allocated_gib"])
        measured["laptop"] = ", ".join(f"{kind} {peak:.2f} GiB" for kind, peak in peaks.items()) or "-"
    print(table(plans, measured))
    if args.detail:
        print()
        print(detail(plans))
    notes = advice(plans)
    if notes:
        print()
        print("\n".join(f"- {note}" for note in notes))


if __name__ == "__main__":
    main()
