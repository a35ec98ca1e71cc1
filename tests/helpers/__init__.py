"""Helpers that several test files share (data files, tiny GGUF and Hub files, export references,
MLX test configs). Test files import from here, never from one another."""
