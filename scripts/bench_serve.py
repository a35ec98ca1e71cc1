"""Load check for `mlxft serve` against llama.cpp and mlx-lm serving the same model: N concurrent
streaming chat clients (the official openai client, greedy, a different prompt each) for each N
in --clients (up to 16), on loopback.

    python scripts/bench_serve.py RUN --servers mlxft,llamacpp,llama-server,mlx-lm --clients 1,4,8,16 --max-tokens 32
    python scripts/bench_serve.py [MODEL_OR_RUN ...] [--backend torch]       # mlxft serve alone
    python scripts/bench_serve.py --tiny 64x2                                # a random llama first
    python scripts/bench_serve.py --url http://127.0.0.1:8080/v1 --model NAME   # a server already running

Servers (each started on a free loopback port, with --threads compute threads):
- mlxft: `mlxft serve RUN` (continuous batching, --max-batch as the server picks it, --dtype auto);
- mlxft-f16: the same with `--dtype float16` (float16 weights, float32 activations);
- llamacpp: mlxft's own f16 GGUF export of RUN (`mlxft export --quant f16`, adapter fused) in
  llama-cpp-python's `Llama` behind a small streaming HTTP loop (below: --llamacpp-server), one
  request at a time;
- llama-server: the same GGUF in llama-cpp-python's own OpenAI server (`python -m
  llama_cpp.server`, the `server` extra: `pip install -e ".[bench]"`), which also serves one
  request at a time (llama.cpp's C++ `llama-server` with parallel slots is not on PyPI);
- mlx-lm: `mlx_lm.server` on the base with RUN's adapter exported in mlx-lm's layout
  (`mlxft export --adapter-format mlx-lm`).
RUN may also be a plain model (no adapter), e.g. the folder `mlxft pull` imported: then every
server serves the base alone.

Reported per server and N: aggregate tokens/s (all completion tokens over the round's wall time),
time to first token p50 and p95, the server's peak resident memory (sampled every 50 ms), errors
and the load average. Bounded: each client times out after --client-timeout seconds and a server
skips its remaining rounds once --budget seconds are spent.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOPICS = ("rivers", "mountains", "bread", "trains", "bees", "clocks", "maps", "violins", "tea", "glass",
          "winter", "robots", "islands", "paper", "bridges", "owls")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_env(threads: int) -> dict:
    n = str(threads)
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n)


def start(cmd: list[str], env: dict, health: str, log: Path) -> subprocess.Popen:
    """Start a server process and wait until `health` answers."""
    import urllib.request

    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 900
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited: {' '.join(cmd)}\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(health, timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit(f"server did not start within 900 s: {' '.join(cmd)}")


def start_mlxft(models: list[str], backend: str, threads: int, work: Path, max_batch: int | None,
                dtype: str = "auto"):
    port = free_port()
    cmd = [sys.executable, "-m", "mlxft", "serve", *models, "--port", str(port), "--backend", backend,
           "--dtype", dtype]
    if max_batch:
        cmd += ["--max-batch", str(max_batch)]
    proc = start(cmd, threads_env(threads), f"http://127.0.0.1:{port}/health", work / f"mlxft-serve-{dtype}.log")
    return proc, f"http://127.0.0.1:{port}/v1", None


def mlxft_cli(*args: str, threads: int) -> None:
    subprocess.run([sys.executable, "-m", "mlxft", *args], env=threads_env(threads), check=True,
                   stdout=subprocess.DEVNULL)


def f16_gguf(run: str, threads: int, work: Path) -> Path:
    gguf = work / "model-f16.gguf"
    if not gguf.exists():
        mlxft_cli("export", run, "-o", str(gguf), "--quant", "f16", "--no-check", threads=threads)
    return gguf


def start_llamacpp(run: str, threads: int, work: Path):
    gguf = f16_gguf(run, threads, work)
    port = free_port()
    cmd = [sys.executable, __file__, "--llamacpp-server", str(gguf), "--port", str(port), "--threads", str(threads)]
    proc = start(cmd, threads_env(threads), f"http://127.0.0.1:{port}/health", work / "llamacpp.log")
    return proc, f"http://127.0.0.1:{port}/v1", "default"


def start_llama_server(run: str, threads: int, work: Path):
    """llama-cpp-python's own server, with the batch settings of the loop above (n_batch 1, see
    serve_llamacpp) so the two differ only in the server around `Llama`."""
    gguf = f16_gguf(run, threads, work)
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "default",
           "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--n_ctx", "2048", "--n_batch", "1", "--n_ubatch", "1",
           "--interrupt_requests", "False"]  # its default lets a new request cut off the one streaming
    proc = start(cmd, threads_env(threads), f"http://127.0.0.1:{port}/v1/models", work / "llama-server.log")
    return proc, f"http://127.0.0.1:{port}/v1", "default"


def start_mlx_lm(run: str, threads: int, work: Path):
    from mlxft.sources import resolve_model

    resolved = resolve_model(run)
    cmd = [sys.executable, "-m", "mlx_lm.server", "--model", str(resolved.path)]
    if resolved.adapter is not None:
        adapter = work / "adapter-mlx-lm"
        if not adapter.exists():
            mlxft_cli("export", run, "-o", str(adapter), "--adapter-format", "mlx-lm", threads=threads)
        cmd += ["--adapter-path", str(adapter)]
    port = free_port()
    cmd += ["--port", str(port)]
    proc = start(cmd, threads_env(threads), f"http://127.0.0.1:{port}/health", work / "mlx-lm.log")
    return proc, f"http://127.0.0.1:{port}/v1", "default_model"


class MemorySampler(threading.Thread):
    def __init__(self, pid: int | None):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self):
        if self.pid is None:
            return
        import psutil

        proc = psutil.Process(self.pid)
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)


SERVERS = ("mlxft", "mlxft-f16", "llamacpp", "llama-server", "mlx-lm")
PROMPT = "Tell me about {topic}."
PROMPT_HOLDER = [PROMPT]  # --prompt
COMPLETIONS = [False]     # --completions: /v1/completions with the prompt as raw text (a base model)


def one_client(client, model: str, i: int, max_tokens: int, start: threading.Barrier, out: list) -> None:
    start.wait()
    t0 = time.perf_counter()
    first, tokens, pieces = None, None, 0
    text = PROMPT_HOLDER[0].format(topic=TOPICS[i % len(TOPICS)])
    common = dict(model=model, temperature=0, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
    try:
        if COMPLETIONS[0]:
            stream = client.completions.create(prompt=text, **common)
        else:
            stream = client.chat.completions.create(messages=[{"role": "user", "content": text}], **common)
        for part in stream:
            if part.usage is not None:
                tokens = part.usage.completion_tokens
            if any((c.text if COMPLETIONS[0] else c.delta.content) for c in part.choices):
                pieces += 1
                if first is None:
                    first = time.perf_counter() - t0
        out.append({"ttft": first, "tokens": tokens if tokens is not None else pieces,
                    "seconds": time.perf_counter() - t0, "error": None})
    except Exception as exc:  # counted and reported, never hidden
        out.append({"ttft": first, "tokens": 0, "seconds": time.perf_counter() - t0,
                    "error": f"{type(exc).__name__}: {exc}"})


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(-(-q * len(ordered) // 100)) - 1))]


def round_of(client, model: str, n: int, max_tokens: int, pid: int | None) -> dict:
    results: list[dict] = []
    barrier = threading.Barrier(n)
    sampler = MemorySampler(pid)
    sampler.start()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=one_client, args=(client, model, i, max_tokens, barrier, results))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    ok = [r for r in results if r["error"] is None]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {"clients": n, "errors": len(results) - len(ok),
            "error_examples": sorted({r["error"] for r in results if r["error"]})[:3],
            "ttft_p50_s": statistics.median(ttfts) if ttfts else None, "ttft_p95_s": percentile(ttfts, 95),
            "tokens": sum(r["tokens"] for r in ok), "total_tok_s": sum(r["tokens"] for r in ok) / wall,
            "wall_s": wall, "server_rss_peak_mib": sampler.peak / 2**20 if pid else None}


def bench_server(name, proc, url, model, args) -> list[dict]:
    import openai

    rows = []
    spent = time.time()
    try:
        client = openai.OpenAI(base_url=url, api_key=args.api_key, max_retries=0, timeout=args.client_timeout)
        model = model or args.model or client.models.list().data[0].id
        if COMPLETIONS[0]:
            client.completions.create(model=model, prompt="warm up", max_tokens=4)
        else:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "warm up"}], max_tokens=4)
        for n in args.counts:
            if time.time() - spent > args.budget:
                print(f"{name:>12}: budget of {args.budget} s spent; clients {n}+ skipped", flush=True)
                break
            row = round_of(client, model, n, args.max_tokens, proc.pid if proc else None)
            row["server"], row["load_average"] = name, os.getloadavg()[0]
            rows.append(row)
            if not args.json:
                print_row(row)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return rows


def main() -> None:
    from mlxft.sysinfo import cpu_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", help="what to serve (default: the built-in model); a run for the peers")
    ap.add_argument("--servers", default="mlxft", help="comma-separated: " + ", ".join(SERVERS))
    ap.add_argument("--tiny", metavar="HIDDENxLAYERS", help="serve a random tiny llama instead (mlxft only)")
    ap.add_argument("--url", help="use a server already running (its /v1 URL)")
    ap.add_argument("--model", help="the model name to request (default: the server's first)")
    ap.add_argument("--api-key", default=os.environ.get("MLXFT_API_KEY", "unused"))
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "mlx"])
    ap.add_argument("--max-batch", type=int, default=None, help="mlxft serve --max-batch (default: its own)")
    ap.add_argument("--clients", default="1,4,8,16", help="comma-separated client counts (each at most 16)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt", default=PROMPT, help="each client's message; {topic} becomes a different word each")
    ap.add_argument("--completions", action="store_true",
                    help="send the prompt as raw text to /v1/completions (a base model without a chat template)")
    ap.add_argument("--threads", type=int, default=1, help="compute threads of every server")
    ap.add_argument("--budget", type=float, default=900, help="seconds per server before its later rounds are skipped")
    ap.add_argument("--client-timeout", type=float, default=600)
    ap.add_argument("--work", help="folder for the exports and server logs (default: a temporary one)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--llamacpp-server", metavar="GGUF", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.llamacpp_server:
        return serve_llamacpp(Path(args.llamacpp_server), args.port, args.threads)
    PROMPT_HOLDER[0] = args.prompt
    COMPLETIONS[0] = args.completions
    args.counts = [int(x) for x in args.clients.split(",")]
    if any(not 1 <= n <= 16 for n in args.counts):
        ap.error("--clients: each count must be from 1 to 16")
    servers = [x.strip() for x in args.servers.split(",") if x.strip()]
    if any(x not in SERVERS for x in servers):
        ap.error("--servers: " + ", ".join(SERVERS))
    if set(servers) - {"mlxft"} and len(args.models) != 1:
        ap.error("the peer servers need exactly one RUN or model to serve")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    models = list(args.models)
    if args.tiny and not args.url:
        from tests.tiny import make_tiny_model_from_spec

        models = [str(make_tiny_model_from_spec(work, args.tiny))]
    if not args.json:
        print(f"bench_serve: {', '.join(models) or 'default'}; greedy, {args.max_tokens} max tokens per reply; "
              f"prompt {args.prompt!r}{' (raw completion)' if args.completions else ''}; "
              f"{args.threads} compute thread(s) per server; CPU: {cpu_model()} ({os.cpu_count()} cores)")
        print(f"{'server':>12} {'clients':>7} {'tok/s agg':>9} {'ttft p50':>9} {'ttft p95':>9} {'tokens':>6} "
              f"{'RSS MiB':>8} {'errors':>6} {'load avg':>8}", flush=True)
    rows = []
    for name in servers if not args.url else ["url"]:
        if name == "url":
            proc, url, model = None, args.url, None
        elif name in ("mlxft", "mlxft-f16"):
            dtype = "float16" if name == "mlxft-f16" else "auto"
            proc, url, model = start_mlxft(models, args.backend, args.threads, work, args.max_batch, dtype)
        elif name == "llamacpp":
            proc, url, model = start_llamacpp(models[0], args.threads, work)
        elif name == "llama-server":
            proc, url, model = start_llama_server(models[0], args.threads, work)
        else:
            proc, url, model = start_mlx_lm(models[0], args.threads, work)
        rows += bench_server(name, proc, url, model, args)
    if args.json:
        print(json.dumps({"cpu": cpu_model(), "models": models, "backend": args.backend, "threads": args.threads,
                          "max_tokens": args.max_tokens, "rows": rows}, indent=2))


def print_row(r: dict) -> None:
    def f(v, spec):
        return format(v, spec) if v is not None else "-"

    print(f"{r['server']:>12} {r['clients']:>7} {r['total_tok_s']:>9.1f} {f(r['ttft_p50_s'], '8.2f')}s "
          f"{f(r['ttft_p95_s'], '8.2f')}s {r['tokens']:>6} {f(r['server_rss_peak_mib'], '8.0f')} {r['errors']:>6} "
          f"{r['load_average']:>8.2f}", flush=True)
    for e in r["error_examples"]:
        print(f"        error: {e}", flush=True)


def serve_llamacpp(gguf: Path, port: int, threads: int) -> None:
    """A minimal OpenAI-style streaming chat endpoint over llama-cpp-python's `Llama` (one request
    at a time under a lock, as llama-cpp-python's own server does), for the comparison above."""
    import asyncio

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from mlxft.export.selfcheck import load_llama

    # n_batch 1: prompts go through llama.cpp's decode kernels one token at a time. On the Xeon
    # this was measured on (f16, 1 thread, a 20-token prompt, load ~6), the first token came after
    # 0.7 s with n_batch 1 against 4-22 s with n_batch 4-512 (its batched f16 path without weight
    # repacking, which crashes on that CPU's AMX), so 1 is llama.cpp's best setting here.
    llm = load_llama(gguf, n_ctx=2048, n_threads=threads, n_batch=1, n_ubatch=1, verbose=False)
    lock = threading.Lock()

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "default", "object": "model", "owned_by": "llama.cpp"}]})

    async def chat(request):
        return await answer(await request.json(), chat=True)

    async def complete(request):
        return await answer(await request.json(), chat=False)

    async def answer(body: dict, chat: bool):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        max_tokens = body.get("max_tokens") or 128

        def produce():
            with lock:
                n = 0
                parts = (llm.create_chat_completion(messages=body["messages"], temperature=0.0, max_tokens=max_tokens,
                                                    stream=True) if chat else
                         llm.create_completion(body["prompt"], temperature=0.0, max_tokens=max_tokens, stream=True))
                for part in parts:
                    choice = part["choices"][0]
                    text = choice["delta"].get("content") if chat else choice.get("text")
                    if text:
                        n += 1
                        loop.call_soon_threadsafe(queue.put_nowait, text)
            loop.call_soon_threadsafe(queue.put_nowait, ("done", n))

        threading.Thread(target=produce, daemon=True).start()

        async def events():
            while True:
                item = await queue.get()
                if isinstance(item, tuple):
                    usage = {"prompt_tokens": 0, "completion_tokens": item[1], "total_tokens": item[1]}
                    yield "data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0,
                                                 "model": "default", "choices": [], "usage": usage}) + "\n\n"
                    yield "data: [DONE]\n\n"
                    return
                piece = {"delta": {"content": item}} if chat else {"text": item}
                chunk = {"id": "x", "object": "chat.completion.chunk" if chat else "text_completion", "created": 0,
                         "model": "default", "choices": [{"index": 0, **piece, "finish_reason": None}]}
                yield "data: " + json.dumps(chunk) + "\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                            Route("/v1/chat/completions", chat, methods=["POST"]),
                            Route("/v1/completions", complete, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
