"""DPO and ORPO against TRL on a tiny model: the same batch (TRL's own tokenization and
collation) and the same LoRA weights give the same loss, reward margins and LoRA gradients.

Tolerances (float32, eps = 1.2e-7). A per-token log-probability is logit - logsumexp over the
vocabulary (49,152 entries, logits of order 1 on this random model, logsumexp about
ln 49152 = 10.8); the two implementations order those operations differently (TRL: log-softmax
of whole rows; mlxft: cross-entropy at target positions only), so each token's value may differ
by a few ulp of 10.8, about 4 x 10.8 x 1.2e-7 = 5e-6. An answer here has at most 40 tokens, so a
summed log-probability differs by at most 40 x 5e-6 = 2e-4 (LOGP_ATOL). A DPO reward is
beta x (policy - reference) of such sums, 0.1 x 2 x 2e-4 = 4e-5, a margin twice that, 8e-5
(REWARD_ATOL 1e-4); the loss moves by at most |d loss / d margin| <= 1 times that (LOSS_ATOL
1e-4). Gradients are sums of many such products: compared within 1e-3 of the largest entry.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

LOGP_ATOL = 2e-4
REWARD_ATOL = 1e-4
LOSS_ATOL = 1e-4
GRAD_RTOL_OF_MAX = 1e-3

PAIRS = [
    {"prompt": [{"role": "user", "content": "What is the capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "assistant", "content": "I think it might be Lyon, or maybe Marseille."}]},
    {"prompt": [{"role": "user", "content": "Name a primary colour."}],
     "chosen": [{"role": "assistant", "content": "Red."}],
     "rejected": [{"role": "assistant", "content": "Purple, probably."}]},
    {"prompt": [{"role": "user", "content": "How many legs does a spider have?"}],
     "chosen": [{"role": "assistant", "content": "Eight."}],
     "rejected": [{"role": "assistant", "content": "Spiders have six legs like insects."}]},
]


def _randomize_lora(model, seed: int) -> None:
    """LoRA B starts at zero (no gradient on A, loss exactly ln 2): give A and B random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _lora_grads(model) -> dict:
    return {n.replace(".default", ""): p.grad.detach().clone() for n, p in model.named_parameters()
            if "lora_" in n and p.grad is not None}


def _backend(tiny_model_dir):
    from mlxft.backends.torch_backend import TorchBackend
    from mlxft.config import Config

    cfg = Config()
    cfg.train.dtype = "float32"
    cfg.train.learning_rate = 1e-3
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout = 4, 8.0, 0.0
    cfg.lora.targets = ["q_proj", "v_proj"]
    backend = TorchBackend(cfg, device="cpu")
    backend.load(tiny_model_dir, train=True)
    _randomize_lora(backend.model, seed=1)
    return backend


def _peft_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _as_batch(input_ids, attention_mask, loss_mask):
    from mlxft.data import Batch

    return Batch(input_ids.numpy().astype(np.int64), attention_mask.numpy().astype(np.int64),
                 loss_mask.numpy().astype(np.int64))


def _compare_grads(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys() and ours
    biggest = max(float(g.abs().max()) for g in theirs.values())
    assert biggest > 0
    for name, g in theirs.items():
        assert torch.allclose(ours[name], g, rtol=0, atol=GRAD_RTOL_OF_MAX * biggest), name


@pytest.mark.parametrize("label_smoothing,sft_weight", [(0.0, 0.0), (0.2, 0.0), (0.0, 0.5)])
def test_dpo_matches_trl(tiny_model_dir, tmp_path, label_smoothing, sft_weight):
    """sft_weight w: TRL's combined loss_type=["sigmoid", "sft"] with loss_weights=[1, w] (the
    chosen answers' NLL per completion token, over the batch, added to DPO's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from mlxft.preference import torch_ops
    from mlxft.preference.losses import Objective
    from mlxft.preference.trainer import PairBatch

    beta = 0.1
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    # TRL 1.16's "sigmoid" has no label smoothing; its "aot" is the same cDPO expression with
    # the log-ratios sorted across the batch, which is the identity for a batch of one pair.
    n_pairs = 3 if label_smoothing == 0 else 1
    loss_type = ["sigmoid" if label_smoothing == 0 else "aot"] + (["sft"] if sft_weight else [])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=n_pairs, beta=beta,
                     loss_type=loss_type, loss_weights=[1.0, sft_weight] if sft_weight else None,
                     label_smoothing=label_smoothing,
                     report_to="none", use_cpu=True, bf16=False, max_length=128, disable_dropout=True,
                     dataset_num_proc=None, precompute_ref_log_probs=False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(PAIRS[:n_pairs]),
                         processing_class=tokenizer, peft_config=_peft_config())
    _randomize_lora(trainer.model, seed=1)
    trainer.model.train()
    inputs = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    theirs = _lora_grads(trainer.model)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    backend = _backend(tiny_model_dir)
    batch = _as_batch(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
    with torch_ops.adapter_off(backend):
        rc, rr, _, _ = torch_ops.pair_logps(backend, batch)
    pc, pr, nc, nr = torch_ops.pair_logps(backend, batch)
    objective = Objective("dpo", beta, label_smoothing, sft_weight=sft_weight)
    backend.optimizer.zero_grad(set_to_none=True)
    ours_loss = torch_ops.backward(backend, [PairBatch(batch, np.stack([rc, rr], 1))], objective,
                                   n_pairs=n_pairs, n_chosen_tokens=int(nc.sum()))
    ours = _lora_grads(backend.model)

    assert abs(ours_loss - float(loss.detach())) < LOSS_ATOL
    if sft_weight:  # the NLL term is there: the loss is well above DPO's alone (at most ~ln 2 here)
        dpo_alone = float(np.mean(-np.log(1 / (1 + np.exp(-beta * ((pc - rc) - (pr - rr)))))))
        nll = -pc.sum() / nc.sum()
        assert abs(ours_loss - (dpo_alone + sft_weight * nll)) < LOSS_ATOL
    assert abs(pc.mean() - metrics["logps/chosen"]) < LOGP_ATOL
    assert abs(pr.mean() - metrics["logps/rejected"]) < LOGP_ATOL
    margin = beta * ((pc - rc) - (pr - rr))
    assert abs(margin.mean() - metrics["rewards/margins"]) < REWARD_ATOL
    assert abs(beta * (pc - rc).mean() - metrics["rewards/chosen"]) < REWARD_ATOL
    assert np.abs(pc - rc).max() > 100 * LOGP_ATOL  # the random adapter moved the policy off the reference
    _compare_grads(ours, theirs)


def test_orpo_matches_trl(tiny_model_dir, tmp_path):
    """TRL's ORPO NLL covers the whole chosen sequence (prompt too); mlxft's covers the answer.
    The odds-ratio term is compared as mlxft computes it, the NLL on TRL's mask, so the whole
    loss and its gradients must agree."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from mlxft.preference import torch_ops
    from mlxft.preference.losses import Objective, TorchOps

    beta = 0.25
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    args = ORPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=3, beta=beta, report_to="none",
                      use_cpu=True, bf16=False, max_length=128, disable_dropout=True, remove_unused_columns=False)
    trainer = ORPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(PAIRS),
                          processing_class=tokenizer, peft_config=_peft_config())
    _randomize_lora(trainer.model, seed=1)
    trainer.model.train()
    inputs = next(iter(trainer.get_train_dataloader()))
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, inputs)
    loss.backward()
    theirs = _lora_grads(trainer.model)

    backend = _backend(tiny_model_dir)
    width = max(inputs["chosen_input_ids"].shape[1], inputs["rejected_input_ids"].shape[1])

    def padded(x, value):
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    ids = torch.cat([padded(inputs["chosen_input_ids"], tokenizer.pad_token_id),
                     padded(inputs["rejected_input_ids"], tokenizer.pad_token_id)])
    attn = torch.cat([padded(inputs["chosen_attention_mask"], 0), padded(inputs["rejected_attention_mask"], 0)])
    answer = torch.cat([padded(inputs["chosen_labels"], -100), padded(inputs["rejected_labels"], -100)]) != -100
    backend.optimizer.zero_grad(set_to_none=True)
    with backend._compute():
        sums, counts = torch_ops.row_logps(backend, _as_batch(ids, attn, answer.long()), need_grad=True)
        full = attn.clone()
        full[:, 0] = 0
        full_sums, full_counts = torch_ops.row_logps(backend, _as_batch(ids[:3], attn[:3], full[:3]), need_grad=True)
        odds_loss, chosen_rewards, rejected_rewards = Objective("orpo", beta).pair_terms(
            TorchOps, sums[:3], sums[3:], counts[:3], counts[3:])
        ours_loss = odds_loss.mean() - full_sums.sum() / full_counts.sum()
        ours_loss.backward()
    ours = _lora_grads(backend.model)

    # ORPO averages log-probabilities per token, so the bound is LOGP_ATOL over the shortest answer.
    assert abs(float(ours_loss) - float(loss)) < LOSS_ATOL
    assert abs(float((chosen_rewards - rejected_rewards).mean()) - metrics["rewards/margins"]) < REWARD_ATOL
    _compare_grads(ours, theirs)
