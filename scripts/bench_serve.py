"""Load check for `mlxft serve`: N concurrent streaming chat clients (the official openai
client), for each N in --clients (up to 16).

    python scripts/bench_serve.py [MODEL_OR_RUN ...] [--backend mlx] [--clients 1,2,4,8,16] [--max-tokens 64]
    python scripts/bench_serve.py --tiny 64x2          # a random llama (hidden x layers) first
    python scripts/bench_serve.py --url http://127.0.0.1:8080/v1 --model NAME   # a server already running

Starts `mlxft serve` on a free loopback port (unless --url), then per N: every client sends one
streamed chat completion at the same moment (a different prompt each, temperature 0). Reported
per N: latency to the first token (median and worst), tokens/s per client (its completion tokens
over its own time from request to last token, median), total tokens/s (all completion tokens
over the wall time of the round), the server's resident memory (peak, sampled), and errors.
The server answers one request at a time (FIFO), so the first-token latency grows with N while
the total rate stays about that of one client.
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


def start_server(models: list[str], backend: str) -> tuple[subprocess.Popen, str]:
    import urllib.request

    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "mlxft", "serve", *models, "--port", str(port),
                             "--backend", backend], env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url + "/v1"
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("server did not start within 600 s")


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


def one_client(client, model: str, i: int, max_tokens: int, start: threading.Barrier, out: list) -> None:
    start.wait()
    t0 = time.perf_counter()
    first = None
    tokens = 0
    try:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}],
            temperature=0, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
        for part in stream:
            if part.usage is not None:
                tokens = part.usage.completion_tokens
            if first is None and any(c.delta.content for c in part.choices):
                first = time.perf_counter() - t0
        out.append({"ttft": first, "tokens": tokens, "seconds": time.perf_counter() - t0, "error": None})
    except Exception as exc:  # counted and reported, never hidden
        out.append({"ttft": first, "tokens": tokens, "seconds": time.perf_counter() - t0,
                    "error": f"{type(exc).__name__}: {exc}"})


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
    rates = [r["tokens"] / r["seconds"] for r in ok if r["seconds"] > 0]
    return {"clients": n, "errors": len(results) - len(ok),
            "error_examples": sorted({r["error"] for r in results if r["error"]})[:3],
            "ttft_median_s": statistics.median(ttfts) if ttfts else None, "ttft_max_s": max(ttfts) if ttfts else None,
            "tokens": sum(r["tokens"] for r in ok), "per_client_tok_s": statistics.median(rates) if rates else None,
            "total_tok_s": sum(r["tokens"] for r in ok) / wall, "wall_s": wall,
            "server_rss_peak_mib": sampler.peak / 2**20 if pid else None}


def main() -> None:
    from mlxft.sysinfo import cpu_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", help="what to serve (default: the built-in model)")
    ap.add_argument("--tiny", metavar="HIDDENxLAYERS", help="serve a random tiny llama instead")
    ap.add_argument("--url", help="use a server already running (its /v1 URL)")
    ap.add_argument("--model", help="the model name to request (default: the server's first)")
    ap.add_argument("--api-key", default=os.environ.get("MLXFT_API_KEY", "unused"))
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "mlx"])
    ap.add_argument("--clients", default="1,2,4,8,16", help="comma-separated client counts (each at most 16)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    counts = [int(x) for x in args.clients.split(",")]
    if any(not 1 <= n <= 16 for n in counts):
        ap.error("--clients: each count must be from 1 to 16")

    import openai

    proc = None
    models = list(args.models)
    if args.tiny and not args.url:
        from tests.tiny import make_tiny_model_from_spec

        models = [str(make_tiny_model_from_spec(Path(tempfile.mkdtemp(prefix="bench-serve-")), args.tiny))]
    if args.url:
        url = args.url
    else:
        proc, url = start_server(models, args.backend)
    header = (f"mlxft serve load check: model {{model}} ({', '.join(models) or 'default'}), backend {args.backend}, "
              f"{args.max_tokens} max tokens per reply, CPU: {cpu_model()} ({os.cpu_count()} cores)")
    rows = []
    try:
        client = openai.OpenAI(base_url=url, api_key=args.api_key, max_retries=0, timeout=600)
        model = args.model or client.models.list().data[0].id
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "warm up"}], max_tokens=4)
        if not args.json:
            print(header.format(model=model))
            print(f"{'clients':>7} {'ttft med':>9} {'ttft max':>9} {'tok/s/client':>12} {'tok/s total':>11} "
                  f"{'tokens':>6} {'RSS MiB':>8} {'errors':>6} {'load avg':>8}", flush=True)
        for n in counts:
            row = round_of(client, model, n, args.max_tokens, proc.pid if proc else None)
            row["load_average"] = os.getloadavg()[0]
            rows.append(row)
            if not args.json:
                print_row(row)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    if args.json:
        print(json.dumps({"cpu": cpu_model(), "model": model, "backend": args.backend, "rows": rows}, indent=2))


def print_row(r: dict) -> None:
    def f(v, spec):
        return format(v, spec) if v is not None else "-"

    print(f"{r['clients']:>7} {f(r['ttft_median_s'], '8.2f')}s {f(r['ttft_max_s'], '8.2f')}s "
          f"{f(r['per_client_tok_s'], '12.1f')} {r['total_tok_s']:>11.1f} {r['tokens']:>6} "
          f"{f(r['server_rss_peak_mib'], '8.0f')} {r['errors']:>6} {r['load_average']:>8.2f}", flush=True)
    for e in r["error_examples"]:
        print(f"        error: {e}", flush=True)


if __name__ == "__main__":
    main()
