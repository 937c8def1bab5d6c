"""A test double of the Ollama server's native API, backed by a real llama.cpp server (so real
model output flows through it): no registry ships an Ollama binary for this machine.

Follows Ollama's documented API (github.com/ollama/ollama/blob/main/docs/api.md):
  GET  /api/tags    models present            GET  /api/ps     models loaded (warm)
  POST /api/pull    NDJSON progress, then the model is present
  POST /api/chat    NDJSON chunks {message: {role, content}, done: false}, then one with
                    done: true, done_reason, prompt_eval_count, eval_count and durations in ns
  POST /api/embed   {embeddings: [[…]], prompt_eval_count, durations}
Plus, for tests only, GET /_double/last_chat: the last /api/chat body it received.

Usage: ollama_double.py PORT CHAT_URL [EMBED_URL] [--present NAME …]
Prints `ready PORT`, serves until its stdin closes.
"""
import json
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

args = sys.argv[1:]
port, chat_url = int(args[0]), args[1].rstrip("/")
embed_url = args[2].rstrip("/") if len(args) > 2 and not args[2].startswith("--") else chat_url
present = set(args[args.index("--present") + 1:]) if "--present" in args else set()
loaded = set()
last_chat = {}
lock = threading.Lock()


def now():
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def stream_start(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def line(self, obj):
        data = (json.dumps(obj) + "\n").encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def stream_end(self):
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def do_GET(self):
        if self.path == "/api/tags":
            with lock:
                models = [{"name": n, "model": n, "modified_at": now(), "size": 98362432,
                           "digest": "b179c9523d0e", "details": {"format": "gguf", "family": "llama",
                           "parameter_size": "135M", "quantization_level": "Q4_1"}} for n in sorted(present)]
            self.reply(200, {"models": models})
        elif self.path == "/api/ps":
            with lock:
                models = [{"name": n, "model": n, "size": 98362432, "size_vram": 0,
                           "expires_at": now()} for n in sorted(loaded)]
            self.reply(200, {"models": models})
        elif self.path == "/_double/last_chat":
            self.reply(200, last_chat)
        else:
            self.reply(404, {"error": "not found"})

    def do_POST(self):
        body = self.body()
        name = body.get("model") or body.get("name") or ""
        if self.path == "/api/pull":
            self.stream_start()
            self.line({"status": "pulling manifest"})
            total = 98362432
            for done in (0, total // 2, total):
                self.line({"status": "pulling b179c9523d0e", "digest": "sha256:b179c9523d0e",
                           "total": total, "completed": done})
            self.line({"status": "verifying sha256 digest"})
            self.line({"status": "writing manifest"})
            self.line({"status": "success"})
            self.stream_end()
            with lock:
                present.add(name)
            return
        with lock:
            known = name in present
        if not known:
            self.reply(404, {"error": f"model '{name}' not found, try pulling it first"})
            return
        if self.path == "/api/chat":
            self.chat(body, name)
        elif self.path == "/api/embed":
            started = time.monotonic_ns()
            inputs = body.get("input")
            inputs = [inputs] if isinstance(inputs, str) else inputs
            request = urllib.request.Request(embed_url + "/v1/embeddings",
                data=json.dumps({"model": name, "input": inputs}).encode(),
                headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request) as r:
                reply = json.load(r)
            with lock:
                loaded.add(name)
            data = sorted(reply["data"], key=lambda d: d["index"])
            self.reply(200, {"model": name, "embeddings": [d["embedding"] for d in data],
                             "total_duration": time.monotonic_ns() - started, "load_duration": 0,
                             "prompt_eval_count": reply.get("usage", {}).get("prompt_tokens", 0)})
        else:
            self.reply(404, {"error": "not found"})

    def chat(self, body, name):
        global last_chat
        last_chat = body
        options = body.get("options") or {}
        upstream = {"model": name, "messages": body.get("messages", []), "stream": True,
                    "stream_options": {"include_usage": True}}
        for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed"),
                             ("stop", "stop"), ("num_predict", "max_tokens")):
            if ours in options:
                upstream[theirs] = options[ours]
        if body.get("format") == "json":
            upstream["response_format"] = {"type": "json_object"}
        started = time.monotonic_ns()
        request = urllib.request.Request(chat_url + "/v1/chat/completions",
            data=json.dumps(upstream).encode(), headers={"Content-Type": "application/json"})
        with lock:
            loaded.add(name)
        self.stream_start()
        usage, reason = {}, "stop"
        with urllib.request.urlopen(request) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices", []):
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        self.line({"model": name, "created_at": now(),
                                   "message": {"role": "assistant", "content": content}, "done": False})
                    if choice.get("finish_reason"):
                        reason = choice["finish_reason"]
        total = time.monotonic_ns() - started
        self.line({"model": name, "created_at": now(), "message": {"role": "assistant", "content": ""},
                   "done": True, "done_reason": reason, "total_duration": total, "load_duration": 0,
                   "prompt_eval_count": usage.get("prompt_tokens", 0), "prompt_eval_duration": total // 4,
                   "eval_count": usage.get("completion_tokens", 0), "eval_duration": total * 3 // 4})
        self.stream_end()


server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
print(f"ready {port}", flush=True)
sys.stdin.read()
