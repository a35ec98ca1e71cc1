"""Continuous batching in `mlxft serve`, driven by the official `openai` client on loopback: many
greedy requests at once each give exactly the text they give alone (MLX in a server process,
PyTorch in-process), streamed and non-streamed rows in one batch, a client that leaves mid-batch
while the others finish intact, the queue bound answering 429 with Retry-After, the prompt cache
giving the same text as no cache, and `generate --prompts-file` equal to one prompt at a time on
both backends.

Exactness: batched rows are left-padded; padding adds exact zeros to each row's attention sums
but changes matmul shapes, so float32 logits may differ from a row run alone in the last bits.
What is checked is what the design promises: the greedy argmax path, on a tiny model whose top
two logits are far apart compared with float32 rounding."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest
from click.testing import CliRunner

from tests.helpers.serve import _InProcess, runs, server_process  # noqa: F401  (runs: a fixture)

pytestmark = pytest.mark.mlx
openai = pytest.importorskip("openai")

PROMPTS = ["What colour is the sky?", "Name a fruit.", "Count to five.", "Say hello in French.",
           "What is two plus two?", "Tell me about cats."]


def _ask(client, model, prompt, n=16, stream=False):
    kw = dict(model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=n)
    if not stream:
        return client.chat.completions.create(**kw).choices[0].message.content
    return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                   if c.choices)


def _at_once(calls):
    """Run the zero-argument `calls` in threads released together; their results in order."""
    out, errors = [None] * len(calls), []
    gate = threading.Barrier(len(calls))

    def run(i):
        gate.wait()
        try:
            out[i] = calls[i]()
        except Exception as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return out


def _health(base_url: str) -> dict:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def batch_server(runs):  # noqa: F811
    with server_process(runs[:1], "--max-batch", "8") as url:
        yield url


def test_concurrent_greedy_requests_equal_alone(batch_server):
    client = openai.OpenAI(base_url=batch_server + "/v1", api_key="x", max_retries=0)
    alone = [_ask(client, "alpha", p) for p in PROMPTS]
    assert len(set(alone)) > 1, "the prompts must get different answers for the test to mean anything"
    together = _at_once([lambda p=p: _ask(client, "alpha", p) for p in PROMPTS])
    assert together == alone
    assert _health(batch_server)["batching"]["peak_batch"] > 1, "the requests were not batched"


def test_streamed_and_not_in_one_batch(batch_server):
    client = openai.OpenAI(base_url=batch_server + "/v1", api_key="x", max_retries=0)
    alone = [_ask(client, "alpha", p, n=24) for p in PROMPTS[:4]]
    got = _at_once([lambda p=p, s=(i % 2 == 0): _ask(client, "alpha", p, n=24, stream=s)
                    for i, p in enumerate(PROMPTS[:4])])
    assert got == alone


def test_disconnect_mid_batch_leaves_others_intact(batch_server):
    client = openai.OpenAI(base_url=batch_server + "/v1", api_key="x", max_retries=0)
    expected = [_ask(client, "alpha", p, n=40) for p in PROMPTS[:3]]
    cancelled_before = _health(batch_server)["batching"]["cancelled"]

    def leaver():
        stream = client.completions.create(model="alpha", prompt="Once upon a time", temperature=0,
                                           max_tokens=400, stream=True)
        for i, _ in enumerate(stream):
            if i == 2:
                break
        stream.close()
        return "left"

    got = _at_once([leaver] + [lambda p=p: _ask(client, "alpha", p, n=40, stream=True) for p in PROMPTS[:3]])
    assert got[1:] == expected
    deadline = time.time() + 20
    while _health(batch_server)["batching"]["cancelled"] == cancelled_before and time.time() < deadline:
        time.sleep(0.1)
    assert _health(batch_server)["batching"]["cancelled"] == cancelled_before + 1


def _slowed(engine, seconds=0.03):
    """Pace the engine's decode steps, so requests overlap for certain on a loaded machine."""
    decoder = engine.scheduler.decoder
    original = decoder.step

    def slow_step():
        time.sleep(seconds)
        return original()

    decoder.step = slow_step


def test_queue_bound_answers_429(runs):  # noqa: F811
    from mlxft.serve.engine import Engine

    engine = Engine([str(runs[0])], backend="mlx", max_batch=1, max_queue=1)
    _slowed(engine)
    with _InProcess(engine) as url:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        first = client.completions.create(model="alpha", prompt="Once upon a time", temperature=0, max_tokens=300,
                                          stream=True)
        next(iter(first))                      # running: the one row of the batch
        waiting = threading.Thread(target=lambda: client.completions.create(
            model="alpha", prompt="Hello", temperature=0, max_tokens=2))
        waiting.start()
        deadline = time.time() + 20
        while len(engine.scheduler._queue) < 1 and time.time() < deadline:
            time.sleep(0.02)
        assert len(engine.scheduler._queue) == 1   # the queue (bound 1) is full now
        with pytest.raises(openai.RateLimitError) as err:
            client.completions.create(model="alpha", prompt="Hi", temperature=0, max_tokens=2)
        assert err.value.status_code == 429 and err.value.code == "queue_full"
        assert int(err.value.response.headers["retry-after"]) >= 1
        first.close()                          # frees the row; the waiting request is served
        waiting.join(30)
        assert not waiting.is_alive()
        assert engine.stats["rejected"] == 1


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_prompt_cache_same_text_as_none(runs, backend):  # noqa: F811
    from mlxft.serve.engine import Engine

    if backend == "torch":
        pytest.importorskip("peft")
    system = "You are a careful assistant who answers in one short sentence. " * 3
    conversation = [[{"role": "system", "content": system}, {"role": "user", "content": p}] for p in PROMPTS[:3]]
    texts = {}
    for cache_mb in (0, 64):
        engine = Engine([str(runs[0])], backend=backend, prompt_cache_mb=cache_mb)
        with _InProcess(engine) as url:
            client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
            texts[cache_mb] = [client.chat.completions.create(model="alpha", messages=m, temperature=0, max_tokens=16)
                               .choices[0].message.content for m in conversation]
            texts[cache_mb].append(client.chat.completions.create(  # the same conversation again: an exact hit
                model="alpha", messages=conversation[0], temperature=0, max_tokens=16).choices[0].message.content)
            cached = engine.scheduler.decoder.stats["cached_tokens"]
        engine.close()
        assert (cached > 0) == (cache_mb > 0), cached
    assert texts[64] == texts[0]


def test_concurrent_torch_requests_equal_alone(runs):  # noqa: F811
    pytest.importorskip("peft")
    from mlxft.serve.engine import Engine

    engine = Engine([str(r) for r in runs], backend="torch", max_batch=8)
    with _InProcess(engine) as url:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        alone = [_ask(client, name, p) for name in ("alpha", "beta") for p in PROMPTS[:3]]
        assert len(set(alone)) > 1
        calls = [lambda n=name, p=p, s=(i % 2 == 0): _ask(client, n, p, stream=s)
                 for i, (name, p) in enumerate((n, p) for n in ("alpha", "beta") for p in PROMPTS[:3])]
        assert _at_once(calls) == alone
        assert engine.stats["peak_batch"] > 1
    engine.close()


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_generate_prompts_file_equals_one_at_a_time(runs, backend, tmp_path):  # noqa: F811
    from mlxft.cli import cli

    if backend == "torch":
        pytest.importorskip("peft")
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    result = CliRunner().invoke(cli, ["generate", str(runs[0]), "--prompts-file", str(path), "-n", "16",
                                      "--backend", backend], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    batched = [json.loads(line)["text"] for line in result.stdout.splitlines()]
    alone = []
    for p in PROMPTS:
        one = CliRunner().invoke(cli, ["generate", str(runs[0]), "-p", p, "-n", "16", "--backend", backend, "--json"],
                                 catch_exceptions=False)
        assert one.exit_code == 0, one.output
        alone.append(json.loads(one.stdout)["text"])
    assert len(set(alone)) > 1
    assert batched == alone


def test_a_failing_step_fails_its_requests_and_serving_goes_on(runs):  # noqa: F811
    from mlxft.serve.engine import Engine

    engine = Engine([str(runs[0])], backend="mlx")
    decoder = engine.scheduler.decoder
    original, failures = decoder.step, [RuntimeError("injected failure")]

    def step():
        if failures:
            raise failures.pop()
        return original()

    decoder.step = step
    with _InProcess(engine) as url:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model="alpha", prompt="Once upon a time", temperature=0, max_tokens=3)
        assert "injected failure" in str(err.value)
        again = client.completions.create(model="alpha", prompt="Once upon a time", temperature=0, max_tokens=3)
        assert again.usage.completion_tokens == 3
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="alpha", prompt="", max_tokens=3)
        assert err.value.param == "prompt"
    engine.close()
