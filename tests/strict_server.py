"""A stand-in for vLLM's OpenAI-compatible server, for tests: the requests the project sends to vLLM, answered as
vLLM answers them, by a local model (a LocalLM) on 127.0.0.1.

What it keeps of vLLM (docs/CLUSTER.md names the version the route is written against):
- chat completions render the messages with the model's own chat template, as they come: a template that raises
  (Mistral-Instruct-v0.2's on a system message or two user turns in a row) is a 400, as vLLM answers it;
- GET /v1/models lists the base model and every adapter loaded, owned by "vllm";
- POST /v1/completions takes token ids and `prompt_logprobs` (one entry per prompt token, None for the first,
  keyed by token id as text), and refuses (400) a prompt plus max_tokens longer than the model's context;
- POST /v1/load_lora_adapter loads a PEFT adapter folder under a name;
- GET /metrics shows the `vllm:cache_config_info` line, whose enable_prefix_caching label says whether prefix
  caching is on.
`faults` makes it answer as some vLLM versions did: {"prompt_logprobs_zero": True} answers prompt_logprobs 0 with
none at all (early V1), {"load_adapter": 500} fails every adapter load with that status.
Every rendered chat prompt is kept in `prompts`, to compare with what the local model renders.
"""

import http.server
import json
import threading

import torch


class StrictServer:
    def __init__(self, lm, name: str, prefix_caching: bool = False, faults=None, context_length=None):
        self.lm, self.name, self.prefix_caching, self.faults = lm, name, prefix_caching, dict(faults or {})
        self.context_length = context_length or lm.context_length  # vLLM's --max-model-len
        self.prompts, self.requests, self.lock = [], [], threading.Lock()

    def __enter__(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                if self.path.endswith("/metrics"):
                    return self.reply(200, server.metrics(), "text/plain")
                if self.path.endswith("/models"):
                    return self.reply(200, server.models())
                return self.reply(404, error("Not Found", 404))

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with server.lock:  # one request at a time: the model is not thread-safe
                    server.requests.append((self.path, body))
                    route = {"/v1/chat/completions": server.chat, "/v1/completions": server.complete,
                             "/v1/load_lora_adapter": server.load_adapter}.get(self.path)
                    status, answer = route(body) if route else (404, error("Not Found", 404))
                self.reply(status, answer, "text/plain" if isinstance(answer, str) else "application/json")

            def reply(self, status, answer, kind="application/json"):
                data = (answer if isinstance(answer, str) else json.dumps(answer)).encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def adapter_of(self, model):
        return None if model == self.name else model

    def models(self):
        names = [self.name, *self.lm.adapters]
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "vllm"} for n in names]}

    def metrics(self) -> str:
        return ("# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
                "# TYPE vllm:cache_config_info gauge\n"
                f'vllm:cache_config_info{{block_size="16",enable_prefix_caching="{self.prefix_caching}",'
                'gpu_memory_utilization="0.9"} 1.0\n')

    def chat(self, body):
        if body["model"] not in [self.name, *self.lm.adapters]:
            return 404, error(f"The model `{body['model']}` does not exist.", 404)
        try:  # the template as it is, as vLLM applies it: no folding, no merging
            text = self.lm.tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
        except Exception as failure:  # jinja's TemplateError, from the template's raise_exception()
            return 400, error(str(failure), 400)
        self.prompts.append(text)
        reply = self.lm.generate([body["messages"]], self.adapter_of(body["model"]), body.get("max_tokens") or 16,
                                 body.get("temperature") or 0.0, body.get("top_p") or 1.0, body.get("seed") or 0)[0]
        return 200, {"id": "chat-0", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                  "finish_reason": "stop"}]}

    @torch.inference_mode()
    def complete(self, body):
        ids, n = body["prompt"], body.get("prompt_logprobs")
        if len(ids) + body.get("max_tokens", 16) > self.context_length:
            return 400, error(f"This model's maximum context length is {self.context_length} tokens. However, you "
                              f"requested {len(ids) + body['max_tokens']} tokens", 400)
        entries = None
        if n is not None and (n > 0 or not self.faults.get("prompt_logprobs_zero")):
            with self.lm.using(None) as model:
                logits = model(torch.tensor([ids], device=self.lm.device)).logits[0].float()
            logprobs = torch.log_softmax(logits, -1)
            entries = [None] + [{str(t): {"logprob": logprobs[i, t].item(), "rank": 1, "decoded_token": ""}}
                                for i, t in enumerate(ids[1:])]
        elif n is not None:
            entries = []  # early V1: `[] if num_prompt_logprobs else None`, and nothing added for 0
        return 200, {"id": "cmpl-0", "object": "text_completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "text": "", "finish_reason": "length", "logprobs": None,
                                  "prompt_logprobs": entries}],
                     "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}}

    def load_adapter(self, body):
        if "load_adapter" in self.faults:
            status = self.faults["load_adapter"]
            return status, error(f"Loading lora {body['lora_name']} failed: rank 64 is greater than max_lora_rank 16",
                                 status)
        self.lm.add_adapter(body["lora_name"], body["lora_path"])
        return 200, f"Success: LoRA adapter '{body['lora_name']}' added successfully."


def error(message: str, code: int) -> dict:
    """vLLM's ErrorResponse."""
    return {"error": {"message": message, "type": "BadRequestError" if code == 400 else "Error", "param": None,
                      "code": code}}
