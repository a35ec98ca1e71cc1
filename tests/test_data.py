"""Data pipeline: format detection, masking on token ids, bad-data errors, batching."""

import json

import numpy as np
import pytest

from mlxft.data import collate, length_grouped_batches, load_dataset, pack, split_dataset, Sample
from mlxft.errors import DataError


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from mlxft.tokenizer import load_tokenizer

    return load_tokenizer(default_model_dir)


def jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def target_text(tok, sample):
    return tok.decode([t for t, m in zip(sample.ids, sample.targets) if m])


def test_chat_masks_every_assistant_turn(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello friend"},
                          {"role": "user", "content": "Bye now"}, {"role": "assistant", "content": "Goodbye pal"}]}]
    ds = load_dataset(jsonl(tmp_path, rows), tokenizer, max_seq_len=512)
    s = ds.samples[0]
    assert ds.fmt == "chat"
    scored = target_text(tokenizer, s)
    # Both assistant turns with their end-of-turn marker, and nothing of the prompt.
    assert scored == "Hello friend<|im_end|>Goodbye pal<|im_end|>"
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sum(1 for t, m in zip(s.ids, s.targets) if m and t == end) == 2
    assert "Hi there" not in scored and "Be brief" not in scored and "Bye now" not in scored


def test_chat_without_masking_scores_everything(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]
    ds = load_dataset(jsonl(tmp_path, rows), tokenizer, max_seq_len=512, mask_prompt=False)
    assert all(ds.samples[0].targets)


def test_completions_masks_prompt(tmp_path, tokenizer):
    ds = load_dataset(jsonl(tmp_path, [{"prompt": "Two plus two?", "completion": "Four."}]), tokenizer, 512)
    assert ds.fmt == "completions"
    assert target_text(tokenizer, ds.samples[0]) == "Four.<|im_end|>"


def test_text_scores_all_tokens_and_eos(tmp_path, tokenizer):
    ds = load_dataset(jsonl(tmp_path, [{"text": "The quick brown fox."}]), tokenizer, 512)
    s = ds.samples[0]
    assert ds.fmt == "text" and all(s.targets)
    assert s.ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(s.ids[:-1]) == "The quick brown fox."


def test_system_prompt_is_inserted_and_not_scored(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]
    ds = load_dataset(jsonl(tmp_path, rows), tokenizer, 512, system_prompt="You are Zed.")
    s = ds.samples[0]
    assert "You are Zed." in tokenizer.decode(s.ids)
    assert target_text(tokenizer, s) == "A<|im_end|>"


def test_truncation_is_counted(tmp_path, tokenizer):
    rows = [{"text": "word " * 200}, {"text": "short"}]
    ds = load_dataset(jsonl(tmp_path, rows), tokenizer, max_seq_len=32)
    assert ds.truncated == 1 and max(len(s) for s in ds.samples) == 32


@pytest.mark.parametrize("rows,match", [
    (['{"text": "ok"}', "{not json"], r"d\.jsonl:2: not valid JSON"),
    ([{"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}], r":1: .*unknown role 'robot'"),
    ([{"prompt": "x"}], r":1: missing field 'completion'"),
    ([{"text": "  "}], r":1: 'text' is empty"),
    ([{"text": 5}], r":1: 'text' must be a string"),
    ([{"messages": [{"role": "user", "content": "only a question"}]}], r":1: conversation has no assistant turn"),
    ([{"foo": 1}], r":1: unknown format"),
    ([[1, 2]], r":1: expected a JSON object"),
    ([{"text": "a"}, {"prompt": "p", "completion": "c"}], r":2: is completions format but earlier lines are text"),
    ([], r"no usable samples"),
])
def test_bad_data_names_file_and_line(tmp_path, tokenizer, rows, match):
    with pytest.raises(DataError, match=match):
        load_dataset(jsonl(tmp_path, rows), tokenizer, 512)


def test_non_utf8_and_directory_and_missing(tmp_path, tokenizer):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid UTF-8"):
        load_dataset(p, tokenizer, 512)
    with pytest.raises(DataError, match="is a directory"):
        load_dataset(tmp_path, tokenizer, 512)
    with pytest.raises(DataError, match="file not found"):
        load_dataset(tmp_path / "nope.jsonl", tokenizer, 512)


def test_skip_bad_lines_counts_them(tmp_path, tokenizer):
    p = jsonl(tmp_path, ['{"text": "good"}', "{broken", '{"text": ""}', '{"text": "fine"}'])
    ds = load_dataset(p, tokenizer, 512, skip_bad_lines=True)
    assert len(ds) == 2 and len(ds.skipped) == 2
    assert ds.skipped[0].startswith(f"{p}:2:")


def test_split_is_seeded_and_disjoint(tmp_path, tokenizer):
    ds = load_dataset(jsonl(tmp_path, [{"text": f"sample {i}"} for i in range(20)]), tokenizer, 512)
    a_train, a_valid = split_dataset(ds, 0.2, seed=1)
    b_train, b_valid = split_dataset(ds, 0.2, seed=1)
    assert [s.ids for s in a_valid.samples] == [s.ids for s in b_valid.samples]
    assert len(a_valid) == 4 and len(a_train) == 16
    with pytest.raises(DataError, match="at least 2 samples"):
        split_dataset(load_dataset(jsonl(tmp_path, [{"text": "one"}], "one.jsonl"), tokenizer, 512), 0.1, 0)


def test_collate_pads_and_masks_first_token():
    b = collate([Sample([1, 2, 3], [True, True, True]), Sample([4, 5], [False, True])], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b.loss_mask.tolist() == [[0, 1, 1], [0, 1, 0]]
    assert b.n_targets == 3


def test_length_grouping_cuts_padding():
    rng = np.random.default_rng(0)
    samples = [Sample([1] * int(n), [True] * int(n)) for n in rng.integers(5, 200, size=256)]
    grouped = length_grouped_batches(samples, 8, seed=0, epoch=0)
    assert sorted(i for b in grouped for i in b) == list(range(256))

    def padding(batches):
        slots = sum(max(len(samples[i]) for i in b) * len(b) for b in batches)
        return 1 - sum(len(s) for s in samples) / slots

    random_batches = [list(range(i, i + 8)) for i in range(0, 256, 8)]
    assert padding(grouped) < padding(random_batches) / 3
    assert grouped != length_grouped_batches(samples, 8, seed=0, epoch=1)  # fresh order each epoch


def test_pack_keeps_samples_apart():
    samples = [Sample([1, 2, 3], [True] * 3), Sample([4, 5], [True] * 2), Sample([6, 7, 8, 9], [True] * 4)]
    b = pack(samples, pad_id=0, max_len=6)
    assert b.n_tokens == 9
    for row in range(b.input_ids.shape[0]):
        seg = b.segment_ids[row]
        for k in set(seg.tolist()) - {0}:
            where = np.where(seg == k)[0]
            assert b.position_ids[row, where].tolist() == list(range(len(where)))
            assert b.loss_mask[row, where[0]] == 0
