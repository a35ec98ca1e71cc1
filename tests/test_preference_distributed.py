"""DPO under torchrun with two ranks equals one process: the reference computed by rank 0 and
sent to rank 1, pairs dealt round-robin, the loss normalised by the global pair count and the
gradients summed over ranks. The tolerance argument is test_distributed.assert_same_training's."""

from __future__ import annotations

import json

import pytest

from tests.helpers.distributed import LR, STEPS, assert_same_training, files, run, single, torchrun, train_args
from tests.helpers.preference import PAIRS, write_jsonl

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def model(tmp_path_factory, default_model_dir):
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", default_model_dir, initializer_range=0.2)


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_torchrun_two_ranks_equal_one_for_preference(model, tmp_path, method):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    sets = [f"train.method={method}", "train.batch_size=3", "train.grad_accumulation=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run(single(train_args(model, data, one, sets)))
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = run(torchrun(train_args(model, data, two, sets)))
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "2 ranks under torchrun" in r2.stderr
    assert_same_training(one, two, LR, STEPS)
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    extra = files(two) - files(one)
    assert extra and all(f.startswith("checkpoint/ranks/1/") for f in extra)
