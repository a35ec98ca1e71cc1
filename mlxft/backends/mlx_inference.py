"""The MLX backend without gradients: scoring (eval_batch, sequence_logprobs, logits), generation
(mlx-lm's generate_step for one stream, its BatchGenerator through mlxft.decode for prompts side by
side) and switching adapters on an inference model."""

from __future__ import annotations

import numpy as np

from mlxft.backends.base import EvalResult
from mlxft.backends.common import eval_mode
from mlxft.data import Batch

GENERATE_BATCH = 16   # rows decoded side by side in generate_batch (mlx-lm BatchGenerator)


class MLXInference:
    """MLXBackend's inference methods (a mixin over the backend's model and compiled functions)."""

    generate_rows = GENERATE_BATCH

    def eval_batch(self, batch: Batch) -> EvalResult:
        mx = self.mx
        fns = self._build()
        with eval_mode(self.model):
            ids, seg, idx, labels, weights = self._arrays(batch)
            loss, correct = fns["evaluate"](ids, seg, idx, labels, weights)
            mx.eval(loss, correct)
        return EvalResult(loss_sum=float(loss.item()), n_targets=batch.n_targets, n_correct=int(correct.item()))

    def logits(self, ids: list[int]):
        mx = self.mx
        training = self.model.training
        self.model.eval()
        out = np.array(self.model(mx.array([ids], dtype=mx.int32))[0].astype(mx.float32))
        if training:
            self.model.train()
        return out

    def sequence_logprobs(self, batch: Batch) -> list[float]:
        mx = self.mx
        with eval_mode(self.model):
            ids = mx.array(batch.input_ids.astype(np.int32))
            logits = self.model(ids)[:, :-1].astype(mx.float32)
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            picked = mx.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
            out = (picked * mx.array(batch.loss_mask[:, 1:].astype(np.float32))).sum(-1)
            out = np.array(out)
        return [float(x) for x in out]

    def generate(self, prompt_ids, max_tokens, temperature=0.0, top_p=1.0, on_token=None, stop_ids=None):
        mx = self.mx
        from mlx_lm.generate import generate_step
        from mlx_lm.sample_utils import make_sampler

        stop = self.stop_ids(stop_ids)
        sampler = make_sampler(temp=temperature, top_p=top_p if temperature > 0 else 0.0)
        out: list[int] = []
        with eval_mode(self.model):
            if max_tokens > 0:
                for tok, _ in generate_step(mx.array(list(prompt_ids), dtype=mx.int32), self.model,
                                            max_tokens=max_tokens, sampler=sampler):
                    tok = int(tok)
                    if tok in stop:
                        break
                    out.append(tok)
                    if on_token is not None:
                        on_token(tok)
        return out

    def decoder(self, max_batch: int = GENERATE_BATCH, prompt_cache_bytes: int = 0, cache_key: str = ""):
        """A continuous-batching decoder on this model: mlx-lm's BatchGenerator (mlxft.decode.mlx_decoder)."""
        from mlxft.decode.mlx_decoder import MLXDecoder

        return MLXDecoder(self.model, max_batch, prompt_cache_bytes, cache_key)

    def generate_batch(self, prompts, max_tokens, temperature=0.0, top_p=1.0, stop_ids=None):
        from mlxft.decode.base import generate_many

        stop = self.stop_ids(stop_ids or ())
        decoder = self.decoder()
        try:
            with eval_mode(self.model):
                return generate_many(decoder, prompts, max_tokens, temperature, top_p, stop, max_batch=GENERATE_BATCH)
        finally:
            decoder.close()

    def use_adapter(self, adapter):
        from mlxft.backends.mlx_adapters import switch_adapter

        switch_adapter(self.model, adapter, self.__dict__.setdefault("_adapter_layers", {}))
        self._fns = {}
