"""Replay answers generated only up to their first sentence end (mlxft.generate_until): a row ends
as soon as its rule holds, its ids are exactly the prefix greedy decoding without the rule
produces, and the replay samples hold exactly those ids."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def backend(tmp_path_factory, default_model_dir):
    """A tiny random llama with varied greedy text (initializer_range 0.2; at 0.02 each row repeats
    one token) whose period is likelier: its head row doubled, so that about every tenth token
    ends a sentence and the answers end after 1 to 40 tokens."""
    from mlxft.backends.torch_backend import TorchBackend
    from mlxft.config import build_config
    from mlxft.templates import for_training
    from tests.tiny import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("varied") / "tiny", default_model_dir, initializer_range=0.2)
    engine = TorchBackend(build_config(None, ["train.dtype=float32"]))
    engine.load(path, train=False)
    engine.chat_setup = for_training(engine.tokenizer, None)
    period = engine.tokenizer(".", add_special_tokens=False)["input_ids"][-1]
    engine.model.get_output_embeddings().weight.data[period] *= 2
    return engine


def _prompts(tok, n):
    return [tok(f"Story {i}: the river", add_special_tokens=False)["input_ids"] for i in range(n)]


@pytest.mark.parametrize("max_batch", [None, 3])  # None: the backend's own; 3: rows ended by the rule are refilled mid-batch
def test_rows_end_where_the_rule_holds_and_keep_the_greedy_prefix(backend, max_batch):
    from mlxft.generate_until import generate_until

    prompts = _prompts(backend.tokenizer, 7)
    full = backend.generate_batch(prompts, 12)

    def rule(ids):  # a rule on the ids so far, as a sentence end is: holds for some rows early, others never
        return len(ids) >= 2 and ids[-1] % 3 == 0

    got = generate_until(backend, prompts, 12, rule, max_batch=max_batch)
    for whole, (ids, end) in zip(full, got):
        first = next((n for n in range(1, len(whole) + 1) if rule(whole[:n])), None)
        if first is None:
            assert ids == whole and end == ("length" if len(whole) == 12 else "stop")
        else:
            assert ids == whole[:first] and end == "until"
    assert any(end == "until" for _, end in got)  # the check would be empty otherwise


def test_replay_generation_stops_at_the_first_sentence(backend, tmp_path, monkeypatch):
    """With data.replay_cut: first_sentence the base model's replay generation ends at the first
    sentence end, and every record and sample holds exactly those ids (text replay) or that text
    (chat replay)."""
    import mlxft.decode.torch_decoder as td
    from mlxft.config import build_config
    from mlxft.replay import _first_sentence, replay_records
    from mlxft.retention import load_probes, probe_prompt_ids
    from mlxft.runs import create_run
    from mlxft.text_replay import (REPLAY_MAX_TOKENS, TEXT_REPLAY_PASSAGES, continuation_records, sentence_cut,
                                   text_sample)

    tok = backend.tokenizer
    tokens = {"n": 0}
    real_step = td.TorchDecoder.step

    def counting_step(self):
        events = real_step(self)
        tokens["n"] += sum(e.token is not None for e in events)
        return events

    monkeypatch.setattr(td.TorchDecoder, "step", counting_step)
    cfg = build_config(None, ["data.replay_cut=first_sentence"])
    run = create_run(tmp_path / "run", model_path=str(tmp_path / "model"))
    records = continuation_records(cfg, run, backend, 12)
    generated = tokens["n"]
    monkeypatch.setattr(td.TorchDecoder, "step", real_step)
    assert records
    for rec in records:
        whole = backend.generate(rec["prompt_ids"], REPLAY_MAX_TOKENS)
        assert rec["completion_ids"] == sentence_cut(tok, whole, first=True)
        sample = text_sample(rec, 512)
        assert sample.ids == rec["prompt_ids"] + rec["completion_ids"]
        assert sample.targets == [False] * len(rec["prompt_ids"]) + [True] * len(rec["completion_ids"])
    # generation stopped there: exactly the tokens up to each first sentence end were generated
    expected = 0
    for p in load_probes(TEXT_REPLAY_PASSAGES)[:12]:
        whole = backend.generate(probe_prompt_ids(tok, p, None), REPLAY_MAX_TOKENS)
        expected += len(sentence_cut(tok, whole, first=True) or whole)
    assert generated == expected < 12 * REPLAY_MAX_TOKENS
    saved_jsonl = [json.dumps(r) for r in records]
    assert continuation_records(cfg, run, backend, 12) == [json.loads(r) for r in saved_jsonl]  # cached

    chats = replay_records(cfg, run, backend, 6)
    assert chats
    for rec in chats:
        prompt = rec["messages"][0]["content"]
        whole = backend.generate(probe_prompt_ids(tok, {"prompt": prompt}, None), 80)
        text = tok.decode(whole, skip_special_tokens=True).strip()
        assert rec["messages"][1]["content"] == _first_sentence(text)


def test_a_cut_replay_answer_trains_its_words_but_not_the_end_of_its_turn(default_model_dir, tmp_path):
    """The base went on after a cut answer (first sentence, or trimmed at the budget), so its
    sample does not teach the model to end the turn there; an answer the base ended itself does."""
    from mlxft.config import build_config
    from mlxft.replay import REPLAY_FILE, replay_samples
    from mlxft.runs import create_run
    from mlxft.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_dir)
    run = create_run(tmp_path / "run", model_path=str(tmp_path))
    records = [{"messages": [{"role": "user", "content": "Why is the sky blue?"},
                             {"role": "assistant", "content": "Air scatters blue light most."}], "id": "a", "cut": cut}
               for cut in (True, False)]
    (run.path / REPLAY_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    cut, whole = replay_samples(build_config(None, ["data.replay=0.5"]), run, tok, 2)
    trained = [[tok.decode([i]) for i, t in zip(s.ids, s.targets) if t] for s in (cut, whole)]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert "".join(trained[0]) == "Air scatters blue light most."
    assert trained[1][:-1] == trained[0] and whole.ids[[i for i, t in enumerate(whole.targets) if t][-1]] == end
    assert cut.ids == whole.ids  # the same tokens, one target fewer
