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
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import numpy as np

from mlxft.backends.base import Backend, EvalResult, StepResult
from mlxft.backends.common import (adapted_layer_count, eos_ids, eval_mode, rank_seed, resolve_lora_targets,
                                   short_name, split_like)
from mlxft.config import Config
from mlxft.data import Batch
from mlxft.errors import ModelError
from mlxft.tokenizer import load_tokenizer

LOSS_CHUNK = 1024     # target positions per LM-head chunk
TARGET_BUCKET = 32    # target count rounded up to this, so compiled shapes repeat
SEQ_BUCKET = 8        # sequence length rounded up to this (pad tokens are never attended)
# Model types whose mlx-lm classes use the HF module names (PEFT keys map 1:1) and build their
# attention mask through the cache hook that packed batches use.
SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
STATE_FILE = "mlx_optimizer.safetensors"


def unsupported_reason(config: dict, remap: dict[str, str]) -> str | None:
    """Why the MLX backend cannot train the model of this config.json, or None when it can.
    `remap`: mlx-lm's model-type aliases (mlx_lm.utils.MODEL_REMAPPING). Imports no mlx."""
    model_type = config.get("model_type", "?")
    if remap.get(model_type, model_type) not in SUPPORTED_TYPES:
        return (f"architecture '{model_type}' is not supported by the MLX backend "
                f"(supported: {', '.join(SUPPORTED_TYPES)}); try --backend torch")
    quant = config.get("quantization")
    if isinstance(quant, dict):
        layers = [quant] + [v for v in quant.values() if isinstance(v, dict)]
        for q in layers:
            mode, bits = q.get("mode", quant.get("mode", "affine")), q.get("bits", quant.get("bits"))
            if mode != "affine" or bits not in SUPPORTED_BITS:
                return (f"MLX quantization mode '{mode}' with {bits} bits is not supported "
                        f"for training (affine {'/'.join(map(str, SUPPORTED_BITS))}-bit only)")
    elif isinstance(config.get("quantization_config"), dict):
        method = config["quantization_config"].get("quant_method", "unknown")
        return (f"quantization '{method}' is not supported by the MLX backend "
                "(use a dense model or an MLX affine-quantized one)")
    return None


def check_model(path: Path) -> dict:
    """config.json of a model the MLX backend can train, or a one-line ModelError naming what is not."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: no readable config.json ({exc})") from None
    from mlx_lm.utils import MODEL_REMAPPING

    reason = unsupported_reason(config, MODEL_REMAPPING)
    if reason:
        raise ModelError(f"{path}: {reason}")
    return config


class _MaskHook:
    """Stands in for a layer's KV cache during a packed forward: caches nothing, supplies the mask."""

    offset = 0

    def __init__(self, allowed, dtype):
        self.allowed, self.dtype = allowed, dtype

    def make_mask(self, n, return_array=False, window_size=None):
        import mlx.core as mx

        allowed = self.allowed
        if window_size:
            i = mx.arange(n)
            allowed = allowed & ((i[:, None] - i[None, :]) < window_size)
        return mx.where(allowed, mx.array(0, self.dtype), mx.array(mx.finfo(self.dtype).min, self.dtype))

    def update_and_fetch(self, keys, values):
        return keys, values


def packed_allowed(seg):
    """(B, 1, T, T) bool: causal within a sample, blocked across samples; padding sees itself."""
    import mlx.core as mx

    t = seg.shape[1]
    i = mx.arange(t)
    causal = i[:, None] >= i[None, :]
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
    pad_self = (seg[:, :, None] == 0) & (i[:, None] == i[None, :])
    return ((same & causal) | pad_self)[:, None]


def tree_map_zeros(tree):
    import mlx.core as mx
    from mlx.utils import tree_map

    return tree_map(mx.zeros_like, tree)


def _flat_f32(arrays):
    import mlx.core as mx

    return mx.concatenate([a.reshape(-1).astype(mx.float32) for a in arrays])


def _unflatten_like(flat, leaves):
    """The tree of (name, array) `leaves` rebuilt from `flat`, in their shapes and dtypes."""
    from mlx.utils import tree_unflatten

    parts = split_like(flat, [like for _, like in leaves])
    return tree_unflatten([(name, part.astype(like.dtype)) for (name, like), part in zip(leaves, parts)])


def _round_up(n: int, k: int) -> int:
    return max(k, -(-n // k) * k)


def _assign(dst, src):
    """Copy tree `src` into tree `dst` in place (compiled steps hold on to dst's containers)."""
    items = dst.items() if isinstance(dst, dict) else enumerate(dst)
    for k, v in list(items):
        if isinstance(v, (dict, list)):
            _assign(v, src[k])
        else:
            dst[k] = src[k]


class MLXBackend(Backend):
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

    def load(self, model_path: Path, adapter: Path | None = None, train: bool = True) -> None:
        mx = self.mx
        model_path = Path(model_path)
        config = check_model(model_path)
        self._setup_device()
        from mlx_lm.utils import load_model

        mx.random.seed(self.cfg.seed)
        try:
            model, _ = load_model(model_path)
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
        model.freeze()
        if adapter is not None:
            from mlxft.backends.mlx_adapters import apply_peft

            apply_peft(model, Path(adapter), dropout=self.cfg.lora.dropout if train else 0.0)
            if not train:
                model.freeze()
        elif train:
            self._attach_lora(model)
        self.model = model
        self._check_head()
        self._fns = {}
        if train:
            import mlx.optimizers as optim

            block = type(model.layers[0])
            if self.cfg.train.grad_checkpoint and not getattr(block, "_mlxft_checkpointed", False):
                from mlx_lm.tuner.trainer import grad_checkpoint

                grad_checkpoint(model.layers[0])  # patches the block class, once per process
                block._mlxft_checkpointed = True
            self.optimizer = optim.AdamW(learning_rate=self.cfg.train.learning_rate or 0.0, betas=[0.9, 0.999],
                                         eps=1e-8, weight_decay=self.cfg.train.weight_decay, bias_correction=True)
            self.optimizer.init(model.trainable_parameters())
            if self.world.rank:
                mx.random.seed(rank_seed(self.cfg.seed, self.world.rank))  # own dropout masks per rank
            model.train()
        else:
            model.eval()
        mx.eval(model.parameters())
        if hasattr(mx, "reset_peak_memory"):
            mx.reset_peak_memory()

    def _metal(self) -> bool:
        try:
            return bool(self.mx.metal.is_available())
        except Exception:
            return False

    def _setup_device(self) -> None:
        """On Metal: wire the recommended working set as mlx-lm does; size the cache limit."""
        mx = self.mx
        try:
            if self._metal():
                from mlx_lm.utils import maybe_set_recommended_wired_limit

                maybe_set_recommended_wired_limit()
                size = mx.device_info().get("max_recommended_working_set_size")
                if size:
                    self._cache_limit = int(size) // 4
        except Exception:  # never fatal: the limit is an optimisation
            pass

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
        tp = _round_up(t, SEQ_BUCKET)
        pad = self.tokenizer.pad_token_id or 0
        ids = np.full((b, tp), pad, dtype=np.int32)
        ids[:, :t] = batch.input_ids
        seg = None
        if batch.segment_ids is not None:
            s = np.zeros((b, tp), dtype=np.int32)
            s[:, :t] = batch.segment_ids
            seg = mx.array(s)
        rows, cols = np.nonzero(batch.loss_mask[:, 1:])
        n = len(rows)
        m = _round_up(n, TARGET_BUCKET)
        idx = np.zeros(m, dtype=np.int32)
        labels = np.zeros(m, dtype=np.int32)
        weights = np.zeros(m, dtype=np.float32)
        idx[:n] = rows * tp + cols
        labels[:n] = batch.input_ids[rows, cols + 1]
        weights[:n] = 1.0
        if count:
            self.stats["tokens"] += batch.n_tokens
            self.stats["slots"] += b * tp
        return mx.array(ids), seg, mx.array(idx), mx.array(labels), mx.array(weights)

    def _hidden(self, ids, seg):
        """Final hidden states (B*T, D)."""
        cache = None
        if seg is not None:
            hook = _MaskHook(packed_allowed(seg), self.dtype)
            cache = [hook] * len(self.model.layers)
        h = self.model.model(ids, cache)
        return h.reshape(-1, h.shape[-1])

    def _chunk_ce(self, h, labels):
        mx = self.mx
        logits = self._head(h).astype(mx.float32)
        ce = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
        return ce, logits

    def _loss_sum(self, ids, seg, idx, labels, weights, need_grad: bool):
        mx = self.mx
        h = mx.take(self._hidden(ids, seg), idx, axis=0)
        n = h.shape[0]
        if n <= LOSS_CHUNK:
            ce, _ = self._chunk_ce(h, labels)
            return (ce * weights).sum()

        def chunk(hc, yc, wc):
            return (self._chunk_ce(hc, yc)[0] * wc).sum()

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
        max_norm = self.cfg.train.max_grad_norm if self.cfg.train.max_grad_norm > 0 else float("inf")

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
                _assign(opt.state, tree_map(keep, opt.state, old_state))
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
                correct = correct + ((mx.argmax(logits, axis=-1) == y) & (w > 0)).sum()
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
        if self.world.distributed:
            grads, loss_total = self._sum_over_ranks(grads, loss_total)
        norm = fns["update"](grads, loss_total)
        mx.eval(self.model.state, self.optimizer.state, mx.random.state, loss_total, norm)
        self._maybe_clear_cache()
        loss_value, norm_value = float(loss_total.item()), float(norm.item())
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        return StepResult(loss=loss_value, n_targets=n_total, grad_norm=norm_value, finite=finite)

    def _sum_over_ranks(self, grads, loss_total):
        """One all_sum per optimizer step: every gradient and the loss in a single flat f32
        array (a rank with an empty shard contributes zeros)."""
        from mlx.utils import tree_flatten

        if grads is None:
            grads = tree_map_zeros(self.model.trainable_parameters())
        leaves = tree_flatten(grads)
        flat = self.world.all_sum_array(_flat_f32([*(g for _, g in leaves), loss_total]))
        return _unflatten_like(flat, leaves), flat[-1]

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
        flat = self.world.broadcast_array(_flat_f32([p for _, p in leaves]))
        self.model.update(_unflatten_like(flat, leaves))
        self.mx.eval(self.model.parameters())
        self._fns = {}

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

    def _maybe_clear_cache(self) -> None:
        mx = self.mx
        try:
            if mx.get_cache_memory() > self._cache_limit:
                mx.clear_cache()
        except AttributeError:
            pass

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
        _assign(self.optimizer.state, tree_map_with_path(lambda p, _: saved[p], self.optimizer.state))
        mx.random.seed(int(saved["__rng_seed__"].item()))
        self._fns = {}

    # ------------------------------------------------------------------ generation

    def generate(self, prompt_ids, max_tokens, temperature=0.0, top_p=1.0, on_token=None, stop_ids=None):
        mx = self.mx
        from mlx_lm.generate import generate_step
        from mlx_lm.sample_utils import make_sampler

        stop = set(stop_ids or ()) | self.chat_stop_ids() | self._eos_ids()
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

    def use_adapter(self, adapter):
        from mlxft.backends.mlx_adapters import switch_adapter

        switch_adapter(self.model, adapter, self.__dict__.setdefault("_adapter_layers", {}))
        self._fns = {}

    def _eos_ids(self) -> set[int]:
        try:
            generation = json.loads((self.model_path / "generation_config.json").read_text()).get("eos_token_id")
        except (OSError, ValueError):
            generation = None
        return eos_ids(self.tokenizer.eos_token_id, self.config.get("eos_token_id"), generation)

    # ------------------------------------------------------------------ reporting

    def device_name(self) -> str:
        mx = self.mx
        try:
            if mx.metal.is_available():
                return f"metal ({mx.device_info().get('device_name', 'Apple GPU')})"
            if hasattr(mx, "cuda") and mx.cuda.is_available():
                return "cuda (mlx)"
        except Exception:
            pass
        return "cpu (mlx)"

    def dtype_name(self) -> str:
        return str(self.dtype).replace("mlx.core.", "") if self.dtype is not None else "float32"

    def peak_memory(self):
        try:
            peak = int(self.mx.get_peak_memory())
        except AttributeError:
            return None
        return peak or None

    def hidden_size(self) -> int | None:
        config = self.config.get("text_config") or self.config
        return config.get("hidden_size")

    def trainable_parameters(self):
        from mlx.utils import tree_flatten
        from mlx_lm.utils import get_total_parameters

        trainable = sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))
        return trainable, int(get_total_parameters(self.model))
