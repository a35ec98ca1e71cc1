"""MLX backend: mlx-lm model classes and LoRA/DoRA layers (`mlx_lm.tuner`), mlxft's own step.

Runs on the Apple GPU (Metal) and, for testing, on Linux with `mlx[cpu]` or `mlx[cuda12]`.
One optimizer step is compiled (`mx.compile` with the model, optimizer and RNG state as inputs
and outputs): gradients of the summed target-token cross-entropy, scaled by 1 / (targets in the
whole accumulated step), are added up over the micro-batches, clipped, and applied by AdamW; a
step whose loss or gradient norm is not finite leaves weights and optimizer state untouched.
The loss is computed only at target positions (gathered before the LM head), in chunks that are
recomputed in backward. Packed batches get an additive block-causal mask from their segment ids
(RoPE is relative, so positions need not restart inside a block-diagonal mask). QLoRA: an
MLX affine-quantized base (`mlx-community/*-4bit`) stays frozen and quantized under the LoRA
layers. Adapters are read and written in the PEFT layout (see mlx_adapters.py).

This file holds loading and the compiled training step; scoring, generation and adapter switching
are in mlx_inference.py, the device side in mlx_device.py, array helpers in mlx_arrays.py.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import numpy as np

from mlxft.backends.base import Backend, StepResult
from mlxft.backends.common import (adapted_layer_count, eval_mode, max_grad_norm, resolve_lora_targets,
                                   short_name)
from mlxft.backends.mlx_arrays import (MaskHook, assign_tree, flat_f32, packed_allowed, round_up, tree_map_zeros,
                                       unflatten_like)
from mlxft.backends.mlx_device import MLXDeviceInfo
from mlxft.backends.mlx_gemma import use_weight_dtype_embed_scale
from mlxft.backends.mlx_inference import MLXInference
from mlxft.config import Config
from mlxft.data import Batch
from mlxft.errors import ModelError
from mlxft.mlx_lm_config import mlx_lm_fields
from mlxft.mlx_support import unsupported_reason
from mlxft.tokenizer import load_tokenizer

LOSS_CHUNK = 1024     # target positions per LM-head chunk
TARGET_BUCKET = 32    # target count rounded up to this, so compiled shapes repeat
SEQ_BUCKET = 8        # sequence length rounded up to this (pad tokens are never attended)
STATE_FILE = "mlx_optimizer.safetensors"


def check_model(path: Path) -> dict:
    """config.json of a model the MLX backend can train, or a one-line ModelError naming what is not."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: no readable config.json ({exc})") from None
    reason = unsupported_reason(config)
    if reason:
        raise ModelError(f"{path}: {reason}")
    return config


class MLXBackend(MLXInference, MLXDeviceInfo, Backend):
    name = "mlx"

    def __init__(self, cfg: Config, world=None):
        super().__init__(cfg, world)
        import mlx.core as mx

        self.mx = mx
        self.model = None
        self.optimizer = None
        self.model_path: Path | None = None
        self.dtype = None
        self._fns: dict = {}
        self.stats = {"tokens": 0, "slots": 0}  # real tokens and computed positions (bench)
        self._cache_limit = 2 << 30

    # ------------------------------------------------------------------ loading

    def seed(self, value: int) -> None:
        self.mx.random.seed(value)

    def _load_base(self, model_path: Path) -> None:
        mx = self.mx
        config = check_model(model_path)
        self._setup_device()
        from mlx_lm.utils import load_model

        self.rope = mlx_lm_fields(config)  # transformers-5 RoPE fields, as mlx-lm's classes read them
        try:
            model, _ = load_model(model_path, model_config=self.rope.overrides)
        except Exception as exc:
            raise ModelError(f"{model_path}: cannot load with mlx-lm ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:200]})") from None
        self.tokenizer = load_tokenizer(model_path, self.trust_remote_code)
        self.model_path, self.config = model_path, config
        if self.cfg.train.dtype != "auto":
            model.set_dtype(getattr(mx, self.cfg.train.dtype))
        elif self._compute_dtype(model) == mx.float32 and self._metal():
            model.set_dtype(mx.bfloat16)  # as the torch backend's auto: bf16 where the GPU computes it
        self.dtype = self._compute_dtype(model)
        use_weight_dtype_embed_scale(model)  # Gemma 3: the embedding scale transformers and llama.cpp use
        model.freeze()
        self.model = model

    def _attach(self, adapter: Path | None, train: bool) -> None:
        rope = self.rope
        if train and rope.exact_up_to is not None and self.cfg.train.max_seq_len > rope.exact_up_to:
            raise ModelError(f"{self.model_path}: mlx-lm computes this model's longrope RoPE as transformers does "
                             f"only up to {rope.exact_up_to} positions; set train.max_seq_len <= {rope.exact_up_to} "
                             "or use --backend torch")
        if adapter is not None:
            from mlxft.backends.mlx_adapters import apply_peft

            apply_peft(self.model, Path(adapter), dropout=self.cfg.lora.dropout if train else 0.0)
            if not train:
                self.model.freeze()
        elif train:
            self._attach_lora(self.model)
        self._check_head()
        self._fns = {}

    def _prepare_training(self) -> None:
        import mlx.optimizers as optim

        if self.cfg.train.neftune_alpha:
            from mlxft.backends.neftune import add_mlx_noise

            gemma = str(self.config.get("model_type", "")).startswith("gemma")
            add_mlx_noise(self.model.model.embed_tokens, self.cfg.train.neftune_alpha,
                          self.config["hidden_size"] ** 0.5 if gemma else 1.0)
        block = type(self.model.layers[0])
        if self.cfg.train.grad_checkpoint and not getattr(block, "_mlxft_checkpointed", False):
            from mlx_lm.tuner.trainer import grad_checkpoint

            grad_checkpoint(self.model.layers[0])  # patches the block class, once per process
            block._mlxft_checkpointed = True
        self.optimizer = optim.AdamW(learning_rate=self.cfg.train.learning_rate or 0.0, betas=[0.9, 0.999],
                                     eps=1e-8, weight_decay=self.cfg.train.weight_decay, bias_correction=True)
        self.optimizer.init(self.model.trainable_parameters())

    def _finish_load(self, train: bool) -> None:
        mx = self.mx
        self.model.train(train)
        mx.eval(self.model.parameters())
        if hasattr(mx, "reset_peak_memory"):
            mx.reset_peak_memory()

    def _compute_dtype(self, model):
        from collections import Counter

        from mlx.utils import tree_flatten

        mx = self.mx
        floats = Counter(v.dtype for _, v in tree_flatten(model.parameters())
                         if mx.issubdtype(v.dtype, mx.floating))
        return floats.most_common(1)[0][0] if floats else mx.float32

    def _attach_lora(self, model) -> None:
        import mlx.nn as nn
        from mlx_lm.tuner.utils import linear_to_lora_layers

        lo = self.cfg.lora
        block = model.layers[0]
        linear = {p for p, m in block.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))}
        names = {short_name(p) for p in linear}
        targets = resolve_lora_targets(lo.targets, names, names)
        keys = linear if targets is None else {p for p in linear if short_name(p) in targets}
        layers = adapted_layer_count(lo.layers, len(model.layers))
        linear_to_lora_layers(model, layers, {"rank": lo.rank, "scale": lo.alpha / lo.rank,
                                              "dropout": lo.dropout, "keys": keys},
                              use_dora=lo.type == "dora")

    def _head(self, h):
        model = self.model
        if "lm_head" in model:
            return model.lm_head(h)
        return model.model.embed_tokens.as_linear(h)

    def _check_head(self) -> None:
        """The hidden-state + head path this backend trains must give the model's own logits."""
        mx = self.mx
        ids = mx.array([[1, 2, 3, 4]], dtype=mx.int32)
        with eval_mode(self.model):
            ours = self._head(self.model.model(ids)).astype(mx.float32)
            ref = self.model(ids).astype(mx.float32)
        if ours.shape != ref.shape or not mx.allclose(ours, ref, rtol=1e-2, atol=1e-2).item():
            raise ModelError(f"{self.model_path}: architecture '{self.config.get('model_type')}' computes its "
                             "logits in a way the MLX backend does not support")

    # ------------------------------------------------------------------ batches

    def _arrays(self, batch: Batch, count: bool = False):
        """(ids, seg, idx, labels, weights) with shapes rounded up to buckets."""
        mx = self.mx
        b, t = batch.input_ids.shape
        tp = round_up(t, SEQ_BUCKET)
        pad = self.tokenizer.pad_token_id or 0
        ids = np.full((b, tp), pad, dtype=np.int32)
        ids[:, :t] = batch.input_ids
        seg = None
        if batch.segment_ids is not None:
            s = np.zeros((b, tp), dtype=np.int32)
            s[:, :t] = batch.segment_ids
            seg = mx.array(s)
        rows, cols = np.nonzero(batch.loss_mask[:, 1:])
        if batch.soft_ids is None:  # one target per position, weight 1
            labels_n, weights_n = batch.input_ids[rows, cols + 1][:, None], 1.0
        else:  # soft targets: K (token, weight) columns per position, weights summing to 1
            labels_n, weights_n = batch.soft_ids[rows, cols + 1], batch.soft_p[rows, cols + 1]
        n, k = len(rows), labels_n.shape[1]
        m = round_up(n, TARGET_BUCKET)
        idx = np.zeros(m, dtype=np.int32)
        labels = np.zeros((m, k), dtype=np.int32)
        weights = np.zeros((m, k), dtype=np.float32)
        idx[:n] = rows * tp + cols
        labels[:n] = labels_n
        weights[:n] = weights_n
        if count:
            self.stats["tokens"] += batch.n_tokens
            self.stats["slots"] += b * tp
        return mx.array(ids), seg, mx.array(idx), mx.array(labels), mx.array(weights)

    def _hidden(self, ids, seg):
        """Final hidden states (B*T, D)."""
        cache = None
        if seg is not None:
            hook = MaskHook(packed_allowed(seg), self.dtype)
            cache = [hook] * len(self.model.layers)
        h = self.model.model(ids, cache)
        return h.reshape(-1, h.shape[-1])

    def _chunk_ce(self, h, labels):
        """Cross-entropy of each position against each of its K label columns (n, K), and the
        logits. Labels are indices, never differentiated (mx.checkpoint would otherwise ask
        for their gradient)."""
        mx = self.mx
        labels = mx.stop_gradient(labels)
        logits = self._head(h).astype(mx.float32)
        ce = mx.logsumexp(logits, axis=-1, keepdims=True) - mx.take_along_axis(logits, labels, axis=-1)
        return ce, logits

    def _loss_sum(self, ids, seg, idx, labels, weights, need_grad: bool):
        """Summed weighted cross-entropy at the target positions: the head runs once per position,
        the K (token, weight) columns of a soft target read the same logits row."""
        mx = self.mx
        h = mx.take(self._hidden(ids, seg), idx, axis=0)
        n = h.shape[0]
        if n <= LOSS_CHUNK:
            ce, _ = self._chunk_ce(h, labels)
            return (ce * weights).sum()

        def chunk(hc, yc, wc):
            return (self._chunk_ce(hc, yc)[0] * mx.stop_gradient(wc)).sum()

        fn = mx.checkpoint(chunk) if need_grad else chunk
        total = mx.array(0.0, mx.float32)
        for i in range(0, n, LOSS_CHUNK):
            total = total + fn(h[i:i + LOSS_CHUNK], labels[i:i + LOSS_CHUNK], weights[i:i + LOSS_CHUNK])
        return total

    # ------------------------------------------------------------------ compiled functions

    def _build(self) -> dict:
        if self._fns:
            return self._fns
        mx = self.mx
        import mlx.nn as nn
        import mlx.optimizers as optim
        from mlx.utils import tree_map

        model, opt = self.model, self.optimizer
        max_norm = max_grad_norm(self.cfg)

        def loss_fn(_model, ids, seg, idx, labels, weights, scale):
            return self._loss_sum(ids, seg, idx, labels, weights, need_grad=True) * scale

        value_and_grad = nn.value_and_grad(model, loss_fn)
        fns: dict = {}
        if opt is not None:
            state = [model.state, opt.state, mx.random.state]

            @partial(mx.compile, inputs=state, outputs=state)
            def micro(ids, seg, idx, labels, weights, scale, prev):
                loss, grads = value_and_grad(model, ids, seg, idx, labels, weights, scale)
                if prev is not None:
                    grads = tree_map(lambda a, b: a + b, grads, prev)
                return loss, grads

            @partial(mx.compile, inputs=state, outputs=state)
            def update(grads, loss):
                grads, norm = optim.clip_grad_norm(grads, max_norm)
                ok = mx.isfinite(norm) & mx.isfinite(loss)
                old_params = model.trainable_parameters()
                old_state = tree_map(lambda x: x, opt.state)
                opt.update(model, grads)
                keep = lambda new, old: mx.where(ok, new, old)  # noqa: E731
                model.update(tree_map(keep, model.trainable_parameters(), old_params))
                assign_tree(opt.state, tree_map(keep, opt.state, old_state))
                return norm

            fns.update(micro=micro, update=update)

        @partial(mx.compile, inputs=[model.state])
        def evaluate(ids, seg, idx, labels, weights):
            h = mx.take(self._hidden(ids, seg), idx, axis=0)
            loss, correct = mx.array(0.0, mx.float32), mx.array(0, mx.int32)
            for i in range(0, h.shape[0], LOSS_CHUNK):
                y, w = labels[i:i + LOSS_CHUNK], weights[i:i + LOSS_CHUNK]
                ce, logits = self._chunk_ce(h[i:i + LOSS_CHUNK], y)
                loss = loss + (ce * w).sum()
                correct = correct + ((mx.argmax(logits, axis=-1) == y[:, 0]) & (w[:, 0] > 0)).sum()
            return loss, correct

        fns["evaluate"] = evaluate
        self._fns = fns
        return fns

    # ------------------------------------------------------------------ compute

    def train_step(self, batches: list[Batch], lr: float, n_total: int | None = None) -> StepResult:
        mx = self.mx
        fns = self._build()
        self.model.train()
        if n_total is None:
            n_total = sum(b.n_targets for b in batches)
        scale = mx.array(1.0 / max(n_total, 1), mx.float32)
        self.optimizer.learning_rate = mx.array(lr, mx.float32)
        grads, loss_total = None, mx.array(0.0, mx.float32)
        for i, batch in enumerate(batches):
            loss, grads = fns["micro"](*self._arrays(batch, count=True), scale, grads)
            loss_total = loss_total + loss
            if i < len(batches) - 1:
                mx.eval(loss_total, grads)
        return self.apply_gradients(grads, loss_total, n_total)

    def apply_gradients(self, grads, loss_total, n_targets: int) -> StepResult:
        """The end of every optimizer step (SFT and preference alike), once this rank's gradients
        are accumulated: sum over ranks, then the compiled clip-and-update (which leaves the
        weights alone when loss or norm is not finite)."""
        mx = self.mx
        fns = self._build()
        if self.world.distributed:
            grads, loss_total = self._sum_over_ranks(grads, loss_total)
        if grads is None:  # no micro-batch on this process
            grads = tree_map_zeros(self.model.trainable_parameters())
        norm = fns["update"](grads, loss_total)
        mx.eval(self.model.state, self.optimizer.state, mx.random.state, loss_total, norm)
        self._maybe_clear_cache()
        loss_value, norm_value = float(loss_total.item()), float(norm.item())
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        return StepResult(loss=loss_value, n_targets=n_targets, grad_norm=norm_value, finite=finite)

    def _sum_over_ranks(self, grads, loss_total):
        """One all_sum per optimizer step: every gradient and the loss in a single flat f32
        array (a rank with an empty shard contributes zeros)."""
        from mlx.utils import tree_flatten

        if grads is None:
            grads = tree_map_zeros(self.model.trainable_parameters())
        leaves = tree_flatten(grads)
        flat = self.world.all_sum_array(flat_f32([*(g for _, g in leaves), loss_total]))
        return unflatten_like(flat, leaves), flat[-1]

    def trainable_finite(self) -> bool:
        from mlx.utils import tree_flatten

        mx = self.mx
        leaves = [p for _, p in tree_flatten(self.model.trainable_parameters())]
        return bool(mx.all(mx.stack([mx.isfinite(p).all() for p in leaves])).item()) if leaves else True

    def broadcast_trainable(self) -> None:
        if not self.world.distributed:
            return
        from mlx.utils import tree_flatten

        leaves = tree_flatten(self.model.trainable_parameters())
        flat = self.world.broadcast_array(flat_f32([p for _, p in leaves]))
        self.model.update(unflatten_like(flat, leaves))
        self.mx.eval(self.model.parameters())
        self._fns = {}


    # ------------------------------------------------------------------ files

    def save_adapter(self, path: Path) -> None:
        from mlxft.backends.mlx_adapters import save_peft

        save_peft(self.model, Path(path), str(self.model_path), self.cfg.lora.dropout)

    def load_adapter_weights(self, adapter: Path) -> None:
        from mlxft.backends.mlx_adapters import switch_adapter

        switch_adapter(self.model, Path(adapter), {})  # fresh LoRA layers around the same base layers
        self._fns = {}

    def save_state(self, path: Path) -> None:
        from mlx.utils import tree_flatten

        mx = self.mx
        arrays = dict(tree_flatten(self.optimizer.state))
        # MLX's RNG state cannot be set from a key, only seeded: reseed here from a drawn seed and
        # save that seed, so the live run and a resumed one continue with the same stream.
        seed = mx.random.randint(0, 2**31 - 1, ())
        mx.random.seed(int(seed.item()))
        arrays["__rng_seed__"] = seed
        mx.save_safetensors(str(Path(path) / STATE_FILE), arrays)

    def load_state(self, path: Path) -> None:
        from mlx.utils import tree_flatten, tree_map_with_path

        mx = self.mx
        file = Path(path) / STATE_FILE
        try:
            saved = mx.load(str(file))
        except Exception as exc:
            raise ModelError(f"{file}: unreadable optimizer state ({exc})") from None
        missing = [k for k, _ in tree_flatten(self.optimizer.state) if k not in saved] + \
            [k for k in ("__rng_seed__",) if k not in saved]
        if missing:
            raise ModelError(f"{file}: optimizer state does not match this adapter (missing {missing[0]})")
        assign_tree(self.optimizer.state, tree_map_with_path(lambda p, _: saved[p], self.optimizer.state))
        mx.random.seed(int(saved["__rng_seed__"].item()))
        self._fns = {}
    # ------------------------------------------------------------------ reporting


    def trainable_parameters(self):
        from mlx.utils import tree_flatten
        from mlx_lm.utils import get_total_parameters

        trainable = sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))
        return trainable, int(get_total_parameters(self.model))
