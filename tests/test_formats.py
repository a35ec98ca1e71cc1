"""Data formats: the same conversation written as chat JSONL, Alpaca (JSONL and a JSON array),
ShareGPT, CSV, TSV, Parquet and Hugging Face datasets (saved folder and local cache) gives the
same token ids and loss mask; tool-calling data goes through the model's own template; bad rows
name the file and the line or row."""

import csv
import json
import shutil
from pathlib import Path

import pytest

from mlxft.data import load_dataset
from mlxft.errors import ConfigError, DataError

SYSTEM, INSTRUCTION, INPUT, ANSWER = "You are terse.", "Name a primary colour.", "Answer in one word.", "Red."
CHAT = {"messages": [{"role": "system", "content": SYSTEM},
                     {"role": "user", "content": f"{INSTRUCTION}\n\n{INPUT}"},
                     {"role": "assistant", "content": ANSWER}]}
ALPACA = {"instruction": INSTRUCTION, "input": INPUT, "output": ANSWER, "system": SYSTEM}
SHAREGPT = {"system": SYSTEM, "conversations": [{"from": "human", "value": f"{INSTRUCTION}\n\n{INPUT}"},
                                                {"from": "gpt", "value": ANSWER}]}


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from mlxft.tokenizer import load_tokenizer

    return load_tokenizer(default_model_dir)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_table(path: Path, rows: list[dict], delimiter=",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def cache_hf_dataset(hf_home: Path, repo_id: str, rows: list[dict]) -> None:
    """Put `rows` in the local datasets cache as `repo_id`, laid out as `datasets` leaves a Hub
    download (NAMESPACE___NAME/default/0.0.0/HASH), without a network."""
    from datasets.packaged_modules.json.json import Json

    src_file = write_jsonl(hf_home.parent / "hf-src.jsonl", rows)
    cache = hf_home / "datasets"
    builder = Json(cache_dir=str(cache), dataset_name=repo_id.split("/")[1],
                   data_files={"train": [str(src_file)]}, hash="0123abcd")
    builder.download_and_prepare()
    built = Path(builder.cache_dir)
    target = cache / repo_id.replace("/", "___") / "default" / built.parent.name / built.name
    target.parent.mkdir(parents=True)
    shutil.move(str(built), str(target))


def sources(tmp: Path) -> dict[str, tuple[str, dict]]:
    """The one conversation in every format: name -> (spec, data options)."""
    from datasets import Dataset, DatasetDict

    array = tmp / "alpaca.json"
    array.write_text(json.dumps([ALPACA], indent=2))
    qa = {"question": INSTRUCTION, "context": INPUT, "answer": ANSWER, "sys": SYSTEM}
    mapping = {"instruction": "question", "input": "context", "output": "answer", "system": "sys"}
    Dataset.from_list([ALPACA]).save_to_disk(str(tmp / "saved"))
    DatasetDict({"train": Dataset.from_list([SHAREGPT])}).save_to_disk(str(tmp / "saved-dict"))
    return {
        "chat": (str(write_jsonl(tmp / "chat.jsonl", [CHAT])), {}),
        "alpaca": (str(write_jsonl(tmp / "alpaca.jsonl", [ALPACA])), {}),
        "alpaca-array": (str(array), {}),
        "sharegpt": (str(write_jsonl(tmp / "sharegpt.jsonl", [SHAREGPT])), {}),
        "csv": (str(write_table(tmp / "d.csv", [qa])), {"columns": mapping}),
        "tsv": (str(write_table(tmp / "d.tsv", [ALPACA], delimiter="\t")), {}),
        "csv-messages": (str(write_table(tmp / "m.csv", [{"messages": json.dumps(CHAT["messages"])}])), {}),
        "parquet": (str(write_parquet(tmp / "d.parquet", [qa])), {"columns": mapping}),
        "parquet-sharegpt": (str(write_parquet(tmp / "s.parquet", [SHAREGPT])), {}),
        "hf-saved": (str(tmp / "saved"), {}),
        "hf-saved-dict": (str(tmp / "saved-dict"), {"split": "train"}),
    }


def test_same_conversation_same_ids_and_mask_in_every_format(tmp_path, tokenizer, monkeypatch):
    hf_home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    cache_hf_dataset(hf_home, "someone/primary-colours", [ALPACA])
    specs = sources(tmp_path)
    specs["hf-cache"] = ("hf:someone/primary-colours", {})
    reference = load_dataset(specs.pop("chat")[0], tokenizer, 256).samples[0]
    assert sum(reference.targets) >= 2 and not all(reference.targets)
    for name, (spec, options) in specs.items():
        ds = load_dataset(spec, tokenizer, 256, **options)
        assert len(ds) == 1, name
        assert ds.samples[0].ids == reference.ids, name
        assert ds.samples[0].targets == reference.targets, name
        assert ds.fmt == "chat"


def test_shape_labels(tmp_path, tokenizer):
    specs = sources(tmp_path)
    labels = {name: load_dataset(spec, tokenizer, 256, **opt).shape for name, (spec, opt) in specs.items()}
    assert labels["alpaca"] == "alpaca" and labels["sharegpt"] == "sharegpt"
    assert labels["csv"] == "alpaca (csv)" and labels["parquet-sharegpt"] == "sharegpt (parquet)"
    assert labels["hf-saved"] == "alpaca (hf)"


def test_completions_and_text_from_csv_match_jsonl(tmp_path, tokenizer):
    rows = [{"prompt": "Two plus two?", "completion": "Four."}, {"prompt": "Three plus one?", "completion": "Four too."}]
    a = load_dataset(write_jsonl(tmp_path / "c.jsonl", rows), tokenizer, 256)
    b = load_dataset(write_table(tmp_path / "c.csv", [{"q": r["prompt"], "a": r["completion"]} for r in rows]),
                     tokenizer, 256, columns={"prompt": "q", "completion": "a"})
    assert [s.ids for s in a.samples] == [s.ids for s in b.samples]
    assert [s.targets for s in a.samples] == [s.targets for s in b.samples]
    t1 = load_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "Hello world."}]), tokenizer, 64)
    t2 = load_dataset(write_parquet(tmp_path / "t.parquet", [{"body": "Hello world."}]), tokenizer, 64,
                      columns={"text": "body"})
    assert t1.samples[0].ids == t2.samples[0].ids and t1.fmt == t2.fmt == "text"


def test_limit_and_split(tmp_path, tokenizer):
    from datasets import Dataset, DatasetDict

    rows = [dict(ALPACA, output=f"Red {i}.") for i in range(5)]
    assert len(load_dataset(write_jsonl(tmp_path / "a.jsonl", rows), tokenizer, 256, limit=3)) == 3
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:2])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_dataset(str(tmp_path / "dd"), tokenizer, 256, split="test")) == 2
    assert len(load_dataset(f"{tmp_path / 'dd'}:test", tokenizer, 256)) == 2
    with pytest.raises(DataError, match=r"no split 'dev' \(splits: train, test\)"):
        load_dataset(str(tmp_path / "dd"), tokenizer, 256, split="dev")


def test_hf_name_not_cached_is_one_clear_line(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    with pytest.raises(DataError) as err:
        load_dataset("hf:nobody/absent", tokenizer, 256)
    assert str(err.value.message).startswith("hf:nobody/absent: not in the local Hugging Face datasets cache")


@pytest.mark.parametrize("name,content,where", [
    ("bad.csv", "instruction,output\nHi,Hello\n,Empty instruction\n", "bad.csv:3: 'instruction' is empty"),
    ("bad.tsv", "instruction\toutput\nHi\tHello\nonly-one-cell\n", "bad.tsv:3: has 1 cells but the header names 2"),
    ("bad.json", json.dumps([ALPACA, {"instruction": "x"}], indent=1), "bad.json:8: missing field 'output'"),
    ("bad.jsonl", json.dumps(SHAREGPT) + "\n" + json.dumps({"conversations": [{"from": "bot", "value": "x"}]}),
     "bad.jsonl:2: conversations[0] has unknown 'from' 'bot'"),
    ("mixed.jsonl", json.dumps(ALPACA) + "\n" + json.dumps(CHAT), "mixed.jsonl:2: is chat format but earlier lines are alpaca"),
])
def test_bad_rows_name_file_and_line(tmp_path, tokenizer, name, content, where):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path / name, tokenizer, 256)
    assert err.value.message.startswith(str(tmp_path / where)), err.value.message


def test_bad_parquet_row_and_missing_column(tmp_path, tokenizer):
    p = write_parquet(tmp_path / "p.parquet", [{"q": "Hi", "a": "Hello"}, {"q": "Bye", "a": ""}])
    with pytest.raises(DataError, match=r"p\.parquet: row 1: 'completion' is empty"):
        load_dataset(p, tokenizer, 256, columns={"prompt": "q", "completion": "a"})
    with pytest.raises(DataError, match=r"p\.parquet: row 0: no column 'answer' \(data.columns.completion\)"):
        load_dataset(p, tokenizer, 256, columns={"prompt": "q", "completion": "answer"})
    ds = load_dataset(p, tokenizer, 256, columns={"prompt": "q", "completion": "a"}, skip_bad_lines=True)
    assert len(ds) == 1 and "row 1" in ds.skipped[0]
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_dataset(tmp_path / "junk.parquet", tokenizer, 256)


def test_bad_column_mapping_is_a_config_error():
    from mlxft.config import build_config

    with pytest.raises(ConfigError, match="data.columns"):
        build_config(None, ["data.columns={question: q}"])
    cfg = build_config(None, ["data.columns={prompt: q, completion: a}", "data.limit=5", "data.split=test"])
    assert cfg.data.columns == {"prompt": "q", "completion": "a"} and cfg.data.limit == 5


# ----------------------------------------------------------------------------- tool calling

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = {"name": "get_weather", "arguments": {"city": "Oslo"}}
TOOL_CHAT = {"tools": TOOLS, "messages": [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": CALL}]},
    {"role": "tool", "content": "{\"temp\": 4}"},
    {"role": "assistant", "content": "It is 4 degrees in Oslo."}]}
# A ChatML template with tools, shaped like Qwen2.5's (tool list in the system turn, calls in
# <tool_call> tags, results as user turns).
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n"
    "</tools><|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- elif m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def tool_tokenizer(default_model_dir):
    from mlxft.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_dir)
    tok.chat_template = TOOL_TEMPLATE
    return tok


def test_tool_calls_in_every_shape_give_same_ids(tmp_path, tool_tokenizer):
    openai_style = json.loads(json.dumps(TOOL_CHAT))
    openai_style["messages"][1]["tool_calls"][0]["function"]["arguments"] = json.dumps(CALL["arguments"])
    sharegpt = {"tools": json.dumps(TOOLS), "conversations": [
        {"from": "human", "value": "Weather in Oslo?"}, {"from": "function_call", "value": json.dumps(CALL)},
        {"from": "observation", "value": "{\"temp\": 4}"}, {"from": "gpt", "value": "It is 4 degrees in Oslo."}]}
    ref = load_dataset(write_jsonl(tmp_path / "t.jsonl", [TOOL_CHAT]), tool_tokenizer, 512)
    assert ref.shape == "tools" and ref.fmt == "chat"
    others = [load_dataset(write_jsonl(tmp_path / "o.jsonl", [openai_style]), tool_tokenizer, 512),
              load_dataset(write_jsonl(tmp_path / "s.jsonl", [sharegpt]), tool_tokenizer, 512),
              load_dataset(write_parquet(tmp_path / "t.parquet", [{"messages": json.dumps(TOOL_CHAT["messages"]),
                                                                   "tools": json.dumps(TOOLS)}]), tool_tokenizer, 512)]
    for ds in others:
        assert ds.samples[0].ids == ref.samples[0].ids and ds.samples[0].targets == ref.samples[0].targets
    s = ref.samples[0]
    scored = tool_tokenizer.decode([t for t, m in zip(s.ids, s.targets) if m])
    # The call and the final answer are learned; the tool list, the question and the tool's result are not.
    assert '"name": "get_weather"' in scored and "It is 4 degrees in Oslo." in scored
    assert "tool_response" not in scored and "Weather for a city" not in scored and "Weather in Oslo?" not in scored
    assert '"name": "get_weather"' in tool_tokenizer.decode(s.ids) and "Weather for a city" in tool_tokenizer.decode(s.ids)


def test_tool_calls_need_a_template_with_tools(tmp_path, tokenizer):
    p = write_jsonl(tmp_path / "tools.jsonl", [CHAT, TOOL_CHAT])
    with pytest.raises(DataError) as err:
        load_dataset(p, tokenizer, 512)
    assert err.value.message.startswith(f"{p}:2: tool calling needs a model whose chat template supports tools")


def test_bad_tool_call_names_line(tmp_path, tool_tokenizer):
    bad = json.loads(json.dumps(TOOL_CHAT))
    bad["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{not json"
    p = write_jsonl(tmp_path / "t.jsonl", [TOOL_CHAT, bad])
    with pytest.raises(DataError, match=r"t\.jsonl:2: 'messages\[1\]\.tool_calls\[0\]\.arguments' is not valid JSON"):
        load_dataset(p, tool_tokenizer, 512)


def test_text_gets_bos_when_the_tokenizer_adds_it_in_post_processing(tmp_path, default_model_dir):
    """Gemma's tokenizer (transformers 5) reports add_bos_token=False yet its post-processor adds
    BOS; plain-text samples must start with BOS then, as the model was pretrained."""
    from tokenizers.processors import TemplateProcessing

    from mlxft.tokenizer import load_tokenizer

    plain_tok = load_tokenizer(default_model_dir)
    plain = load_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "Hello world."}]), plain_tok, 64).samples[0]
    assert plain.ids[0] != plain_tok.bos_token_id
    tok = load_tokenizer(default_model_dir)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    assert not getattr(tok, "add_bos_token", False) and tok("a")["input_ids"][0] == tok.bos_token_id
    sample = load_dataset(tmp_path / "t.jsonl", tok, 64).samples[0]
    assert sample.ids == [tok.bos_token_id] + plain.ids and sample.targets[0] is False


def test_train_reads_a_mapped_csv_and_prints_the_data_check(tmp_path, tiny_model_dir, capsys):
    """`mlxft train` end to end on a CSV with data.columns and data.limit (tiny model, 2 steps)."""
    pytest.importorskip("torch")
    from mlxft.config import build_config
    from mlxft.pipeline import train_run

    rows = [{"q": f"What is code {i}?", "a": f"Code {i} is {'alpha bravo charlie'.split()[i % 3]}."} for i in range(12)]
    data = write_table(tmp_path / "codes.csv", rows)
    cfg = build_config(None, [f"model={tiny_model_dir}", f"data.train={data}", "data.columns={prompt: q, completion: a}",
                              "data.limit=10", "train.steps=2", "train.batch_size=4", "train.dtype=float32",
                              "retention.enabled=false", "backend=torch"])
    summary = train_run(cfg, tmp_path / "run")
    assert summary["steps"] == 2
    err = capsys.readouterr().err
    assert "data check: 10 samples (completions (csv))" in err
    assert "data: 9 train / 1 valid samples" in err
