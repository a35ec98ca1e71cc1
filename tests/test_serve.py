"""`mlxft serve` driven by the official `openai` client on loopback: chat completions (streamed
and not) equal to `mlxft generate` at temperature 0, text completions, two runs of one base
served side by side, every bad-request case, the API key, a client that disconnects mid-stream,
and the PyTorch backend."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
from click.testing import CliRunner

from tests.helpers.serve import _free_port, _generate, _InProcess, runs, server_process  # noqa: F401  (runs: a fixture)

pytestmark = pytest.mark.mlx
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

PROMPT = "What colour is the sky?"


@pytest.fixture(scope="module")
def server(runs, session_home):
    """`mlxft serve RUN_A RUN_B` as a real process on a loopback port."""
    os.environ["MLXFT_HOME"] = str(session_home)
    with server_process(runs) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def test_models_listed(client):
    assert sorted(m.id for m in client.models.list().data) == ["alpha", "beta"]
    assert client.models.retrieve("beta").id == "beta"


def test_chat_equals_generate_streamed_and_not(client, runs):
    expected = _generate(runs[0], PROMPT, 12)
    assert expected, "the tiny model must say something for the comparison to mean anything"
    reply = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": PROMPT}],
                                           temperature=0, max_tokens=12)
    assert reply.choices[0].message.content == expected
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 0

    stream = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": PROMPT}],
                                            temperature=0, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, used = [], None, None
    for part in stream:
        if part.usage is not None:
            used = part.usage
        for choice in part.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == expected and len([p for p in pieces if p]) > 1
    assert finish in ("stop", "length") and used.completion_tokens == reply.usage.completion_tokens


def test_two_adapters_side_by_side(client, runs):
    a, b = (_generate(run, "Once upon a time", 16, raw=True) for run in runs)
    assert a != b, "the two adapters must answer differently for the test to mean anything"
    got = {}
    for name in ("alpha", "beta", "alpha"):  # switch there and back
        got.setdefault(name, []).append(client.completions.create(model=name, prompt="Once upon a time",
                                                                  temperature=0, max_tokens=16).choices[0].text)
    assert got["alpha"] == [a, a] and got["beta"] == [b]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="beta", prompt="Once upon a time", temperature=0, max_tokens=16, stream=True) if c.choices)
    assert streamed == b


def test_stop_and_seed(client, runs):
    full = _generate(runs[0], "Once upon a time", 16, raw=True)
    stop = full[len(full) // 2:][:3]
    cut = client.completions.create(model="alpha", prompt="Once upon a time", temperature=0, max_tokens=16, stop=stop)
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model="alpha", prompt="Once upon a time", temperature=1.0, top_p=0.9,
                                         max_tokens=16, seed=seed).choices[0].text for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_bad_requests(client, server):
    import urllib.error
    import urllib.request

    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 404 and err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="alpha", messages=[])
    assert err.value.status_code == 400 and err.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert err.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "word " * 600}])
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="alpha", prompt="hi", max_tokens=100000)
    assert err.value.code == "context_length_exceeded"

    request = urllib.request.Request(server + "/v1/chat/completions", data=b'{"model": "alpha", "messages": [',
                                     headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(request, timeout=10)
    assert http.value.code == 400
    assert json.loads(http.value.read())["error"]["type"] == "invalid_request_error"


def test_api_key_and_disconnect_stops_generation(runs):
    from mlxft.serve.engine import Engine

    engine = Engine([str(runs[0])], backend="mlx")
    decoder = engine.scheduler.decoder
    original = decoder.step

    def slow_step():
        time.sleep(0.02)
        return original()

    decoder.step = slow_step
    with _InProcess(engine, api_key="sesame") as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url, api_key="sesame", max_retries=0)
        assert [m.id for m in good.models.list().data] == ["alpha"]

        stream = good.completions.create(model="alpha", prompt="Once upon a time", max_tokens=400, temperature=0,
                                         stream=True)
        for i, _ in enumerate(stream):
            if i == 2:
                break
        stream.close()
        deadline = time.time() + 10
        while engine.stats["cancelled"] < 1 and time.time() < deadline:
            time.sleep(0.05)
        assert engine.stats["cancelled"] == 1
        tokens = engine.stats["tokens"]
        assert tokens < 100, tokens  # stopped soon after the client left, not after 400 tokens
        time.sleep(0.5)
        assert engine.stats["tokens"] == tokens
        again = good.completions.create(model="alpha", prompt="Once upon a time", max_tokens=3, temperature=0)
        assert again.usage.completion_tokens == 3

        # not streamed: the server notices the closed connection while generating
        body = json.dumps({"model": "alpha", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0})
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sesame\r\n"
                          f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
            time.sleep(0.5)
        before = engine.stats["tokens"]
        deadline = time.time() + 10
        while engine.stats["cancelled"] < 2 and time.time() < deadline:
            time.sleep(0.05)
        assert engine.stats["cancelled"] == 2 and engine.stats["tokens"] - before < 100


def test_torch_backend_serves_the_same_text(runs):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from mlxft.serve.engine import Engine

    engine = Engine([str(r) for r in runs], backend="torch")
    with _InProcess(engine) as url:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        for run, name in zip(runs, ("alpha", "beta")):
            expected = _generate(run, PROMPT, 10, backend="torch")
            reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": PROMPT}],
                                                   temperature=0, max_tokens=10)
            assert reply.choices[0].message.content == expected


def test_one_run_is_served_with_its_adapter_folded_in(runs):
    """Serving one run loads its adapter with the model, as `generate` does: on f32 PyTorch the
    adapter is merged into the weights (no PEFT layers left) and the text is generate's."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft.tuners.tuners_utils import BaseTunerLayer

    from mlxft.serve.engine import Engine

    engine = Engine([str(runs[0])], backend="torch")
    assert engine.preloaded is not None and engine.scheduler.adapter == engine.preloaded
    assert not any(isinstance(m, BaseTunerLayer) for m in engine.backend.model.modules())
    with _InProcess(engine) as url:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        reply = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": PROMPT}],
                                               temperature=0, max_tokens=10)
        assert reply.choices[0].message.content == _generate(runs[0], PROMPT, 10, backend="torch")


def test_serve_refuses_runs_of_different_bases(runs, tmp_path, default_model_dir):
    from mlxft.cli import cli

    result = CliRunner().invoke(cli, ["serve", str(runs[0]), str(default_model_dir), "--port", str(_free_port())])
    assert result.exit_code == 1 and "one server serves runs of one base" in result.output
