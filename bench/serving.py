"""Serving under load: serve.py against `transformers serve --continuous-batching` and against
generate() with fixed batches, on the same random model and the same requests.

  python -m bench.serving [--config tiny] [--requests 32] [--concurrency 1 4 16] [--write]

HF's server needs FastAPI (`pip install fastapi`, as `transformers[serving]` would install it);
it is a benchmark's dependency only.

Each server runs in its own process on this machine; `concurrency` clients (httpx, streaming,
greedy) take the requests in order, each sending its next as soon as its previous one ends.
Prompts are slices of Python's own `os.py` source of 20 to 150 words, answers 16 to 128 tokens
(an eos ends one earlier, the same for every side). Figures per concurrency: output tokens per
second over the whole run, time to the first token (TTFT) and between tokens (ITL: a request's
(last - first token's arrival) / (tokens - 1)), medians over requests. generate() gets the same
requests in batches of `concurrency` (each batch runs to its longest answer; a batch's requests
get their tokens when it ends). Every side runs each load twice and is timed the second time:
steady state, our programs compiled (serve.py compiles a prefill per bucket of batch and
prompt length as it first meets it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

from bench import common, report

TOKENIZER = "tokenizer.model.v1"  # mistral-common's copy of Mistral 7B's, 32000 pieces


def make_model(config_name: str, root: str) -> tuple[str, str]:
    """A random HF model of the config with Mistral's v1 tokenizer (as HF reads it, and as we
    do), and its conversion: (hf dir, our checkpoint dir)."""
    import mistral_common

    model, _ = common.random_hf_model(common.CONFIGS[config_name].replace(dtype="float32"))
    hf, ours = os.path.join(root, "hf"), os.path.join(root, "ours")
    model.save_pretrained(hf)
    shutil.copy(os.path.join(os.path.dirname(mistral_common.__file__), "data", TOKENIZER),
                os.path.join(hf, "tokenizer.model"))
    with open(os.path.join(hf, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "add_bos_token": True}, f)
    subprocess.run([sys.executable, os.path.join(common.REPO, "convert_weights.py"), hf, ours, "--dtype", "float32"],
                   check=True, capture_output=True)
    return hf, ours


def make_requests(n: int, seed: int = 0) -> list[dict]:
    words = open(os.__file__).read().split()
    rng = random.Random(seed)
    requests = []
    for _ in range(n):
        length = rng.randint(20, 150)
        start = rng.randrange(len(words) - length)
        requests.append({"prompt": " ".join(words[start:start + length]), "max_tokens": rng.randint(16, 128)})
    return requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(command: list[str], url: str) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{command[0]} exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)


async def drive(url: str, model: str, requests: list[dict], concurrency: int) -> dict:
    """Streams every request through `concurrency` clients; throughput, TTFT and ITL."""
    queue = list(enumerate(requests))
    ttft, itl, tokens = [], [], 0

    async def client(http):
        nonlocal tokens
        while queue:
            _, request = queue.pop(0)
            body = {"model": model, **request, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            sent, arrivals, used = time.perf_counter(), [], None
            async with http.stream("POST", url + "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"{url}: {response.status_code} {(await response.aread()).decode()[:500]}")
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        used = chunk["usage"]["completion_tokens"]
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        arrivals.append(time.perf_counter())
            n = used if used is not None else len(arrivals)
            tokens += n
            if arrivals:
                ttft.append(arrivals[0] - sent)
                if n > 1:
                    itl.append((arrivals[-1] - arrivals[0]) / (n - 1))

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=None) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    return {"tok_s": tokens / seconds, "ttft": statistics.median(ttft), "itl": statistics.median(itl),
            "tokens": tokens}


def fixed_batches(checkpoint: str, requests: list[dict], concurrency: int) -> dict:
    """generate() over batches of `concurrency` requests, in order."""
    from mistral_jax import Tokenizer, generate, load_checkpoint

    config, params = load_checkpoint(checkpoint)
    tokenizer = Tokenizer(os.path.join(checkpoint, "tokenizer.model"))
    prompts = [tokenizer.encode(r["prompt"]) for r in requests]
    for _ in range(2):  # the first pass compiles each batch's shapes; the second is timed
        start, tokens, latency = time.perf_counter(), 0, []
        for i in range(0, len(requests), concurrency):
            batch = requests[i:i + concurrency]
            out = generate(config, params, prompts[i:i + concurrency], max(r["max_tokens"] for r in batch))
            tokens += sum(min(len(o), r["max_tokens"]) for o, r in zip(out, batch))
            latency += [time.perf_counter() - start] * len(batch)
    return {"tok_s": tokens / (time.perf_counter() - start), "latency": statistics.median(latency), "tokens": tokens}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", choices=["tiny", "small", "default"])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--write", action="store_true", help="rewrite the serving section of BENCHMARKS.md")
    args = p.parse_args()
    requests = make_requests(args.requests)
    slots = max(args.concurrency)
    rows = {c: {} for c in args.concurrency}
    with tempfile.TemporaryDirectory() as root:
        hf, ours = make_model(args.config, root)
        sides = {
            "ours": lambda port: [sys.executable, os.path.join(common.REPO, "serve.py"), "--checkpoint", ours,
                                  "--port", str(port), "--slots", str(slots), "--max-len", "1024",
                                  "--model-name", "m"],
            "hf": lambda port: [shutil.which("transformers") or "transformers", "serve", "--continuous-batching",
                                "--port", str(port), hf],
        }
        for side, command in sides.items():
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            process = start_server(command(port), url)
            model = "m" if side == "ours" else hf
            try:
                for c in args.concurrency:
                    asyncio.run(drive(url, model, requests, c))  # compiles each shape this load admits
                    rows[c][side] = asyncio.run(drive(url, model, requests, c))
                    print(side, c, rows[c][side], file=sys.stderr)
            finally:
                process.terminate()
                process.wait(60)
        for c in args.concurrency:
            rows[c]["generate"] = fixed_batches(ours, requests, c)
            print("generate", c, rows[c]["generate"], file=sys.stderr)

    table = [f"`python -m bench.serving --config {args.config} --requests {args.requests} --concurrency "
             f"{' '.join(map(str, args.concurrency))}` on {report.machine_description()}; {report.versions()}; "
             f"our server with --slots {slots}, HF's `transformers serve --continuous-batching`.", "",
             "| clients | ours tok/s | HF serve tok/s | generate() tok/s | ours / HF | ours / generate | "
             "TTFT ours / HF (ms) | ITL ours / HF (ms) |", "|---|---|---|---|---|---|---|---|"]
    for c, row in rows.items():
        o, h, g = row["ours"], row["hf"], row["generate"]
        table.append(f"| {c} | {o['tok_s']:.1f} | {h['tok_s']:.1f} | {g['tok_s']:.1f} | {o['tok_s'] / h['tok_s']:.2f}x "
                     f"| {o['tok_s'] / g['tok_s']:.2f}x | {o['ttft'] * 1e3:.0f} / {h['ttft'] * 1e3:.0f} "
                     f"| {o['itl'] * 1e3:.1f} / {h['itl'] * 1e3:.1f} |")
    print("\n".join(table))
    if args.write:
        report.rewrite_section(os.path.join(common.REPO, "BENCHMARKS.md"), "bench:serving", "\n".join(table))


if __name__ == "__main__":
    main()
