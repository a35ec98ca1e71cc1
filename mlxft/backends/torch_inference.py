"""The PyTorch backend without gradients: scoring (eval_batch, row_scores, sequence_logprobs,
logits, target_top_k), generation through mlxft.decode (one prompt streamed, or prompts side by side with
continuous refill) and switching adapters on an
inference model."""

from __future__ import annotations

import contextlib
from pathlib import Path

from mlxft.backends.base import EvalResult
from mlxft.backends.common import eval_mode
from mlxft.backends.torch_device import LOSS_CHUNK
from mlxft.data import Batch

# Rows decoded side by side in generate_batch and generate_until (continuous refill). 60 answers of
# up to 80 tokens, float32, 2 threads, Intel Xeon (Sapphire Rapids): 32 rows ran 1.50x (SmolLM2-135M)
# and 1.66x (Gemma 3 270M) the rate of 16 with no higher peak RSS; 64 rows 1.88x on SmolLM2 at
# +271 MiB peak (docs/serve.md).
GENERATE_BATCH = 32


class TorchInference:
    """TorchBackend's inference methods (a mixin over the backend's model, head and batches)."""

    generate_rows = GENERATE_BATCH

    @contextlib.contextmanager
    def _inference(self):
        """No dropout and no gradients; the model goes back to training mode afterwards. A fresh
        adapter runs as the base model it still is (fresh_lora_skipped)."""
        with eval_mode(self.model), self.torch.no_grad(), fresh_lora_skipped(getattr(self, "_tuner_layers", ())):
            yield

    def eval_batch(self, batch: Batch) -> EvalResult:
        torch = self.torch
        head, cap = self._head()
        with self._inference(), self._compute():
            hidden, labels = self._hidden(batch)
            loss_sum, correct = 0.0, 0
            for i in range(0, hidden.shape[0], LOSS_CHUNK):
                logits = self._chunk_logits(hidden[i:i + LOSS_CHUNK], head, cap)
                y = labels[i:i + LOSS_CHUNK]
                loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(-1) == y).sum())
        return EvalResult(loss_sum=loss_sum, n_targets=int(labels.numel()), n_correct=correct)

    def logits(self, ids: list[int]):
        torch = self.torch
        x = torch.tensor([ids], device=self.device)
        self._pick_attention(len(ids))
        with self._inference(), self._compute():
            return self._causal_lm()(input_ids=x, use_cache=False).logits[0].float().cpu().numpy()

    def row_scores(self, batch: Batch) -> list[EvalResult]:
        torch = self.torch
        head, cap = self._head()
        with self._inference(), self._compute():
            hidden, labels = self._hidden(batch)
            rows = torch.from_numpy(batch.loss_mask[:, 1:]).bool().nonzero()[:, 0].to(self.device)
            n_rows = batch.input_ids.shape[0]
            loss = torch.zeros(n_rows, dtype=torch.float64, device=self.device)
            correct = torch.zeros(n_rows, dtype=torch.int64, device=self.device)
            for i in range(0, hidden.shape[0], LOSS_CHUNK):
                logits = self._chunk_logits(hidden[i:i + LOSS_CHUNK], head, cap)
                y, r = labels[i:i + LOSS_CHUNK], rows[i:i + LOSS_CHUNK]
                ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
                loss.index_add_(0, r, ce.double())
                correct.index_add_(0, r, (logits.argmax(-1) == y).long())
        counts = batch.loss_mask[:, 1:].sum(-1)
        return [EvalResult(loss_sum=float(loss[i]), n_targets=int(counts[i]), n_correct=int(correct[i]))
                for i in range(n_rows)]

    def target_top_k(self, batch: Batch, k: int):
        torch = self.torch
        head, cap = self._head()
        ids, vals = [], []
        with self._inference(), self._compute():
            hidden, _ = self._hidden(batch)
            for i in range(0, hidden.shape[0], LOSS_CHUNK):
                logits = self._chunk_logits(hidden[i:i + LOSS_CHUNK], head, cap)
                v, t = logits.topk(min(k, logits.shape[-1]), dim=-1)
                ids.append(t.cpu())
                vals.append(v.cpu())
        if not ids:
            return torch.zeros((0, k), dtype=torch.int64).numpy(), torch.zeros((0, k)).numpy()
        return torch.cat(ids).numpy(), torch.cat(vals).numpy()

    def sequence_logprobs(self, batch: Batch) -> list[float]:
        torch = self.torch
        ids, attn, mask, _ = self._tensors(batch)
        self._pick_attention(ids.shape[1])
        with self._inference(), self._compute():
            logits = self._causal_lm()(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
            return [float(x) for x in (logp * mask).sum(-1)]

    def decoder(self, max_batch: int = GENERATE_BATCH, prompt_cache_bytes: int = 0, cache_key: str = ""):
        """A continuous-batching decoder on this model (mlxft.decode.torch_decoder)."""
        from mlxft.decode.prefix_cache import PrefixCache
        from mlxft.decode.torch_decoder import TorchDecoder

        return TorchDecoder(self.model, PrefixCache(prompt_cache_bytes) if prompt_cache_bytes > 0 else None, cache_key)

    def generate(self, prompt_ids, max_tokens, temperature=0.0, top_p=1.0, on_token=None, stop_ids=None):
        from mlxft.decode.base import SeqRequest

        out: list[int] = []
        if max_tokens <= 0:
            return out
        decoder = self.decoder(max_batch=1)
        decoder.insert(SeqRequest(0, list(prompt_ids), max_tokens, temperature, top_p,
                                  stop_ids=frozenset(self.stop_ids(stop_ids or ()))))
        with self._inference():
            while len(decoder):
                for event in decoder.step():
                    if event.token is not None:
                        out.append(event.token)
                        if on_token is not None:
                            on_token(event.token)
        return out

    def generate_batch(self, prompts, max_tokens, temperature=0.0, top_p=1.0, stop_ids=None):
        """Prompts side by side through the continuous-batching decoder: a row is refilled with
        the next prompt as soon as its own answer ends."""
        from mlxft.decode.base import generate_many

        with self._inference():
            return generate_many(self.decoder(), prompts, max_tokens, temperature, top_p,
                                 self.stop_ids(stop_ids or ()), max_batch=GENERATE_BATCH)

    def use_adapter(self, adapter):
        import hashlib

        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer

        if adapter is None:
            if isinstance(self.model, PeftModel):
                self.model.base_model.disable_adapter_layers()
            return
        name = "a" + hashlib.sha1(str(Path(adapter).resolve()).encode()).hexdigest()[:12]
        if not isinstance(self.model, PeftModel):
            self.model = PeftModel.from_pretrained(self.model, str(adapter), adapter_name=name)
        elif name not in self.model.peft_config:
            self.model.load_adapter(str(adapter), adapter_name=name)
        self.model.base_model.enable_adapter_layers()
        self.model.set_adapter(name)
        self.model.eval()
        self._tuner_layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def fresh_lora_skipped(layers):
    """Run LoRA layers whose every B matrix is still zero (a fresh adapter: the base model's
    answers, replay and first validation are computed before training) as their base layers.
    Their low-rank path adds exactly zero, so the outputs are the same bits, and it cost a
    quarter of a decode step: SmolLM2-135M, bf16, 22 rows, 66 ms a token against 51 ms with the
    adapter off (Intel Xeon with AMX, 2 threads). Plain LoRA only: a fresh DoRA layer rescales by
    a norm ratio that rounds. Layers already switched off, or any B not zero, leave all as is."""
    import torch

    live = [m for m in layers if not m.disable_adapters and not m.merged]
    if not live or len(live) < len(layers) or not all(_zero_plain_lora(m, torch) for m in live):
        yield
        return
    grads = [(p, p.requires_grad) for m in live for p in m.parameters()]
    for m in live:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in live:
            m.enable_adapters(True)
        for p, needed in grads:
            p.requires_grad_(needed)


def _zero_plain_lora(layer, torch) -> bool:
    names = layer.active_adapters
    if any(n not in getattr(layer, "lora_B", {}) or n in getattr(layer, "lora_variant", {})
           or getattr(layer, "use_dora", {}).get(n) for n in names):
        return False
    return not any(bool(torch.count_nonzero(layer.lora_B[n].weight)) for n in names)
