"""A miniature stand-in for Mistral-7B-Instruct-v0.2, built offline from the embedded model's tokenizer.

Mistral's architecture and config (MISTRAL_7B_INSTRUCT_V02 with a few small layers: STANDIN_SIZES), random
weights, and the embedded SmolLM2 tokenizer dressed as Mistral's (standin_tokenizer: 32000 tokens,
<unk>/<s>/</s> at ids 0/1/2, Mistral-Instruct-v0.2's strict chat template). Saved with save_pretrained, so
`hf:<folder>` loads through local_models.load_local as the real model does, in 4-bit too (`--load_in_4bit yes`,
also on a CPU). Random weights write garbage text, which is what the plumbing needs to survive (templates,
4-bit loading, LoRA on a quantized base, stopping at the token cap, odd tokens), not a model to learn from.

    python tests/mistral_standin.py runs/mistral-standin --cache_dir cache
    python 02_simulate.py --questioner hf:runs/mistral-standin --roleplayer hf:runs/mistral-standin ...
"""

import argparse
import json
import sys
from pathlib import Path

import torch

# Mistral-7B-Instruct-v0.2's chat template as released (tokenizer_config.json): no system role, strictly
# alternating user/assistant turns, no generation prompt.
MISTRAL_V02_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Mistral-7B-Instruct-v0.2's config.json, written out (MistralConfig keyword arguments): no download needed.
MISTRAL_7B_INSTRUCT_V02 = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1e6, sliding_window=None, rms_norm_eps=1e-5,
    tie_word_embeddings=False, hidden_act="silu", initializer_range=0.02, attention_dropout=0.0,
    bos_token_id=1, eos_token_id=2, use_cache=True)

# The miniature's sizes: Mistral's ratios (4 query heads per key-value head, MLP 3.5 x hidden), small enough
# that a CPU runs it in 4-bit in seconds. Every projection's output is a multiple of 32: on CPUs with
# AVX512-BF16, bitsandbytes repacks 4-bit weights for inference in blocks of 32 rows and asserts it.
STANDIN_SIZES = dict(hidden_size=128, intermediate_size=448, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=1)

# Mistral's special tokens take the ids of the embedded tokenizer's first three (its <|endoftext|>,
# <|im_start|>, <|im_end|>), which are Mistral's own ids for them.
MISTRAL_SPECIALS = {0: "<unk>", 1: "<s>", 2: "</s>"}


def standin_tokenizer(embedded_dir):
    """The embedded model's byte-level BPE tokenizer dressed as Mistral-Instruct-v0.2's.

    Its vocabulary is cut to Mistral's 32000 tokens: SmolLM2's ids follow its merge order, so keeping the
    ids below 32000 and the merges among them is itself a valid BPE tokenizer, a little coarser than the
    original. On this project's prompts (roles.py's instructions and examples, data/ personas and tasks) it
    makes 4% fewer tokens than Mistral's own tokenizer (3712 vs 3869; the full SmolLM2 vocabulary: 3617).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((Path(embedded_dir) / "tokenizer.json").read_text())
    size = MISTRAL_7B_INSTRUCT_V02["vocab_size"]
    vocab = {token: i for token, i in spec["model"]["vocab"].items() if i < size}
    for token in spec["added_tokens"]:
        if token["id"] in MISTRAL_SPECIALS:
            del vocab[token["content"]]
            token["content"] = MISTRAL_SPECIALS[token["id"]]
            vocab[token["content"]] = token["id"]
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < size]
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if {m[0], m[1], m[0] + m[1]} <= vocab.keys()]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                        unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = MISTRAL_V02_TEMPLATE
    return tokenizer


def build_standin(folder, embedded_dir, seed: int = 0) -> Path:
    """Write the stand-in (config, random bf16 weights as in Mistral's checkpoint, tokenizer) to `folder`."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    model = MistralForCausalLM(MistralConfig(**{**MISTRAL_7B_INSTRUCT_V02, **STANDIN_SIZES})).to(torch.bfloat16)
    model.save_pretrained(folder)
    standin_tokenizer(embedded_dir).save_pretrained(folder)
    return Path(folder)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="where to write the stand-in (then use it as hf:<folder>)")
    parser.add_argument("--cache_dir", default="cache", help="where the embedded model is (or will be) cached")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from local_models import embedded_model_dir

    print(f"stand-in for Mistral-7B-Instruct-v0.2 in {build_standin(args.folder, embedded_model_dir(args.cache_dir))}")


if __name__ == "__main__":
    main()
