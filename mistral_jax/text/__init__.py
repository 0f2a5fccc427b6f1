"""Text to tokens and back: every tokenizer a Mistral release ships, its chat format, decoding a
token stream piece by piece."""
