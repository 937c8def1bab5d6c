"""Runs llama.cpp's own HTTP server in-process (PyPI xllamacpp) on a GGUF model, for the
gateway tests and the quick start: `serve.py MODEL.gguf PORT ALIAS [--embedding]`.

Prints `ready <port>` on stdout once /health answers, then serves until killed (SIGTERM), or
with `--watch-stdin` until its stdin closes (the parent died). One thread (see shared/TOOLCHAIN.md: two collapse on a busy 2-core machine).
"""
import sys
import threading
import time
import urllib.request

import xllamacpp as xlc


def main():
    if len(sys.argv) < 4:
        sys.exit("usage: serve.py MODEL.gguf PORT ALIAS [--embedding] [--ctx N] [--parallel N] [--watch-stdin]")
    model, port, alias = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    args = sys.argv[4:]
    params = xlc.CommonParams()
    params.model.path = model
    params.model_alias = {alias}
    params.port = port
    params.n_ctx = int(args[args.index("--ctx") + 1]) if "--ctx" in args else 2048
    params.n_parallel = int(args[args.index("--parallel") + 1]) if "--parallel" in args else 2
    params.cpuparams.n_threads = 1
    params.cpuparams_batch.n_threads = 1
    params.warmup = False
    params.use_jinja = True
    if "--embedding" in args:
        params.embedding = True
        params.pooling_type = xlc.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
        params.n_batch = 512
        params.n_ubatch = 512
    server = xlc.Server(params)
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    break
        except Exception:
            pass
        if time.time() > deadline:
            sys.exit(f"the server on port {port} did not become healthy within 60 s")
        time.sleep(0.1)
    print(f"ready {port}", flush=True)
    done = threading.Event()
    if "--watch-stdin" in args:
        threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait()
    del server


if __name__ == "__main__":
    main()
