"""mlxft: fine-tune open LLMs locally with LoRA, and export them for local runtimes."""

__version__ = "0.1.0"
