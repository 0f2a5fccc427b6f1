"""Serving: OpenAI's HTTP API over the continuous-batching engine (serve.py)."""
