"""`mlxft chat` driven through a pseudo-terminal: send a line, read the streamed answer (the
model's greedy answer under its chat template), /reset, /exit; piped stdin; llama.cpp for GGUF."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest

PROMPT = ">>> "


@pytest.fixture(scope="module")
def chatty_model(tmp_path_factory, default_model_dir):
    """Tiny model with an untied head, so its greedy answers are visible words."""
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("chat") / "tiny", default_model_dir, seed=0,
                           tie_word_embeddings=False)


def expected_answer(model, message, history=(), max_tokens=8) -> str:
    from mlxft.inference import format_prompt, load_for_inference

    engine, _ = load_for_inference(str(model), "torch")
    ids = format_prompt(engine.tokenizer, message, history=list(history))
    return engine.tokenizer.decode(engine.generate(ids, max_tokens), skip_special_tokens=True)


class Terminal:
    """A child process on a pty (stdin/stdout); stderr goes to a file so spinners stay out."""

    def __init__(self, args, stderr_path):
        self.master, slave = pty.openpty()
        self.err = open(stderr_path, "w")
        env = dict(os.environ, TERM="dumb")  # no bracketed-paste or colour escapes from readline
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=self.err, close_fds=True, env=env)
        os.close(slave)
        self.buffer = b""

    def read_until(self, marker: bytes, timeout: float = 120) -> str:
        """Everything up to and including `marker`; records how many reads it took."""
        deadline = time.time() + timeout
        self.reads = 0
        while marker not in self.buffer:
            left = deadline - time.time()
            if left <= 0 or self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                raise AssertionError(f"no {marker!r} in {self.buffer!r}")
            ready, _, _ = select.select([self.master], [], [], min(left, 1.0))
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:
                    chunk = b""
                self.buffer += chunk
                self.reads += 1
        head, _, self.buffer = self.buffer.partition(marker)
        return (head + marker).decode("utf-8", "replace").replace("\r\n", "\n")

    def send(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def close(self):
        try:
            self.proc.wait(timeout=60)
        finally:
            os.close(self.master)
            self.err.close()


def test_chat_through_pty(chatty_model, tmp_path):
    first = expected_answer(chatty_model, "hello there")
    follow = expected_answer(chatty_model, "and then?",
                             history=[{"role": "user", "content": "hello there"},
                                      {"role": "assistant", "content": first}])
    assert first.strip() and follow != first
    term = Terminal([sys.executable, "-m", "mlxft", "chat", str(chatty_model), "--max-tokens", "8"],
                    tmp_path / "stderr.txt")
    try:
        term.read_until(PROMPT.encode())
        term.send("hello there")
        out = term.read_until(PROMPT.encode())
        assert out == f"hello there\n{first}\n{PROMPT}"  # the echo, the streamed answer, a new prompt
        term.send("and then?")
        assert term.read_until(PROMPT.encode()) == f"and then?\n{follow}\n{PROMPT}"  # the history is used
        term.send("/reset")
        term.read_until(PROMPT.encode())
        term.send("hello there")
        assert term.read_until(PROMPT.encode()) == f"hello there\n{first}\n{PROMPT}"  # fresh conversation
        term.send("/exit")
    finally:
        term.close()
    assert term.proc.returncode == 0
    err = (tmp_path / "stderr.txt").read_text()
    assert "/reset" in err and "(conversation cleared)" in err


def test_chat_piped_stdin(chatty_model, tmp_path):
    """Without a terminal: no prompt, answers one per line, ends at end of input."""
    first = expected_answer(chatty_model, "hello there", max_tokens=6)
    proc = subprocess.run([sys.executable, "-m", "mlxft", "chat", str(chatty_model), "-n", "6"],
                          input="hello there\n\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == first + "\n"


@pytest.mark.slow
@pytest.mark.llamacpp
def test_chat_gguf_with_llama_cpp(tmp_path):
    """A GGUF runs through llama.cpp with its own chat template: the streamed answer equals
    llama.cpp's non-streamed greedy answer, and the second turn sees the first."""
    pytest.importorskip("llama_cpp")
    from mlxft.sources.default import default_gguf_path

    gguf = default_gguf_path()
    from mlxft.export.selfcheck import load_llama  # no AMX repacking (crashes on some CPUs)

    llm = load_llama(gguf, n_ctx=2048, seed=0, verbose=False)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    first = llm.create_chat_completion(messages=messages, max_tokens=12, temperature=0.0)
    first = first["choices"][0]["message"]["content"]
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And of Italy?"}]
    second = llm.create_chat_completion(messages=messages, max_tokens=12, temperature=0.0)
    second = second["choices"][0]["message"]["content"]
    proc = subprocess.run([sys.executable, "-m", "mlxft", "chat", str(gguf), "-n", "12"],
                          input="What is the capital of France?\nAnd of Italy?\n/exit\n", capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "llama.cpp" in proc.stderr and first.strip()
    assert proc.stdout == f"{first}\n{second}\n"


def test_chat_engine_errors(tmp_path):
    from click.testing import CliRunner

    from mlxft.cli import cli

    res = CliRunner().invoke(cli, ["chat", str(tmp_path), "--engine", "llama.cpp"])
    assert res.exit_code == 1 and "needs a .gguf file" in res.output


@pytest.mark.mlx
def test_chat_mlx_backend(chatty_model):
    """The MLX backend chats the same greedy answer as the torch one (float32 tiny model)."""
    pytest.importorskip("mlx_lm")
    first = expected_answer(chatty_model, "hello there", max_tokens=6)
    proc = subprocess.run([sys.executable, "-m", "mlxft", "chat", str(chatty_model), "-n", "6", "--backend", "mlx"],
                          input="hello there\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "(mlx" in proc.stderr and proc.stdout == first + "\n"
