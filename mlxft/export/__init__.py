"""Export: GGUF files for llama.cpp / Ollama / LM Studio (gguf.py, with per-architecture tables
in archs.py and the tokenizer in tokenizer.py), K-quants via llama.cpp (quantize.py), and
Ollama Modelfiles (ollama.py). Nothing heavy is imported here."""
