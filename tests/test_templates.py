"""The chat template a run trains with: the fallback when a base has none (family or plain, said
in one line), recorded in the run, and rendered by the Modelfile's Go TEMPLATE exactly as the
chat template renders it (checked with Go's own text/template, for every supported family)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlxft import templates as T
from mlxft.export.ollama import modelfile_system, modelfile_text
from mlxft.export.selfcheck import check_modelfile


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


@pytest.fixture(scope="module")
def bare_tok(tok):
    """The SmolLM2 vocabulary without a chat template (as a base model ships)."""
    from copy import deepcopy

    bare = deepcopy(tok)
    bare.chat_template = None
    return bare


@pytest.fixture(scope="module")
def unknown_tok(tmp_path_factory):
    """A small BPE vocabulary with no family's turn markers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(["hello world, what is this? an answer. ### User: Assistant:"] * 20,
                            trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="[UNK]")


from mlxft.export.selfcheck import go_renderer_installed  # noqa: E402

needs_go = pytest.mark.skipif(not go_renderer_installed(), reason="py-go-template renders Go templates as Ollama does")


@needs_go
@pytest.mark.parametrize("family", [*T.FAMILIES, "plain"])
@pytest.mark.parametrize("system", [None, "Be brief.\nUse digits."])
def test_every_family_modelfile_template_renders_like_its_chat_template(family, system, tok):
    jinja = T.FAMILIES[family][0] if family in T.FAMILIES else T.PLAIN
    bos = "<|im_start|>" if family == "gemma" else None  # a BOS the runtime adds: left out of the comparison
    chat = T.ChatSetup(("{{ bos_token }}" + jinja) if bos else jinja, "family", family,
                       eos_token=tok.eos_token, bos_token=bos)
    result = check_modelfile(T.go_template(chat), system, tok, chat)
    assert result == {"ok": True, "samples": 2}, result


@needs_go
def test_conformance_check_finds_a_template_that_differs(tok):
    chat = T.ChatSetup(T.FAMILIES["chatml"][0], "family", "chatml", eos_token=tok.eos_token)
    wrong = T.go_template(chat).replace("{{ .Content }}<|im_end|>", "{{ .Content }} <|im_end|>")
    result = check_modelfile(wrong, None, tok, chat)
    assert result["ok"] is False and result["reason"].startswith("differs at character")
    assert check_modelfile("{{ if }", None, tok, chat)["reason"].startswith("TEMPLATE does not render")


@needs_go
def test_model_template_default_system_goes_into_the_modelfile(tok):
    chat = T.choose(tok)
    assert (chat.source, chat.family, chat.stop_tokens) == ("model", "chatml", ["<|im_end|>"])
    system = modelfile_system(chat, tok)
    assert system and "SmolLM" in system  # SmolLM2's template inserts it when a chat has no system turn
    assert check_modelfile(T.go_template(chat), system, tok, chat)["ok"] is True
    assert check_modelfile(T.go_template(chat), None, tok, chat)["ok"] is False
    text, go = modelfile_text("./m.gguf", chat, system)
    assert text.startswith("FROM ./m.gguf\nTEMPLATE \"\"\"") and 'PARAMETER stop "<|im_end|>"' in text
    assert f'SYSTEM """{system}"""' in text and go in text


def test_fallback_is_the_family_template_when_the_vocabulary_shows_it(bare_tok, unknown_tok):
    chat = T.choose(bare_tok, system_prompt="Be brief.")
    assert (chat.source, chat.family) == ("family", "chatml") and chat.template == T.FAMILIES["chatml"][0]
    assert chat.stop_tokens == ["<|im_end|>"] and "ChatML" in chat.describe()
    plain = T.choose(unknown_tok)
    assert (plain.source, plain.family, plain.stop_tokens) == ("plain", "plain", ["</s>"])
    assert "plain template" in plain.describe()
    rendered = T.render(unknown_tok, plain.template, [{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": "hello"}])
    assert rendered == "### User:\nhi\n\n### Assistant:\nhello</s>\n\n"


def test_training_without_a_template_says_so_and_records_it(tmp_path, default_model_dir, capsys):
    from mlxft.config import build_config
    from mlxft.pipeline import train_run
    from tests.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "m", default_model_dir)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (model / extra).unlink(missing_ok=True)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Q{i}?"},
                                                     {"role": "assistant", "content": f"A{i}."}]}) + "\n"
                            for i in range(6)))
    cfg = build_config(None, ["train.steps=1", "train.batch_size=2", "train.dtype=float32", "retention.enabled=false",
                              "data.replay=0", "train.eval_every=1", "train.learning_rate=1e-3"],
                       {"model": str(model), "data": {"train": str(data), "system_prompt": "Be brief."}})
    train_run(cfg, tmp_path / "run")
    assert "chat template: the base model has no chat template; using the ChatML" in capsys.readouterr().err
    recorded = json.loads((tmp_path / "run" / T.RECORD_FILE).read_text())
    assert recorded["template"] == T.FAMILIES["chatml"][0] and recorded["system_prompt"] == "Be brief."
    assert recorded["stop_tokens"] == ["<|im_end|>"] and recorded["source"] == "family"
    assert T.recorded(Path(tmp_path / "run")).family == "chatml"
