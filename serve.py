"""Serves a mistral_jax checkpoint over OpenAI's HTTP API, with continuous batching.

  python serve.py --checkpoint DIR [--port 8000] [--slots 8] [--max-len 4096] [--model-name NAME]
  python serve.py --checkpoint DIR --port 0        # a free port; the address is printed

Endpoints: POST /v1/completions and /v1/chat/completions (the checkpoint's chat format;
"stream": true for server-sent events), GET /v1/models and /health (200 once the model is
loaded and compiled, 503 before). Any OpenAI client works:

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
  client.chat.completions.create(model="DIR's name", messages=[{"role": "user", "content": "Hi"}])

`--slots` requests decode together in one batched rolling cache of `--max-len` tokens each;
others wait in a queue (429 beyond `--max-queue`). SIGTERM stops accepting connections, lets
requests in flight finish (at most `--shutdown-timeout` seconds) and exits.
"""

from mistral_jax.runtime import cli, platforms


def main():
    # The library is imported here, after platforms.restart_with_huge_pages has run.
    from mistral_jax.serving.server import ServeOptions, serve

    p = cli.parser(__doc__)
    cli.add_options(p, ServeOptions)
    serve(cli.options(ServeOptions, p.parse_args()))


if __name__ == "__main__":
    platforms.restart_with_huge_pages()
    cli.run(main)
