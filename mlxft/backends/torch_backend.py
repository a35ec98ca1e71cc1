"""PyTorch backend: transformers model + PEFT LoRA/DoRA, on CUDA when present, else CPU.

Speed and memory (measured on a 2-core AVX512-BF16 CPU with SmolLM2-135M; docs/benchmarks.md):
- frozen base weights stored in bf16 on a GPU that computes bf16, and on a CPU where a bf16 matmul
  is measured faster than f32 (cpu_bf16_pays: a CPU flag alone decides nothing); LoRA weights
  (the only trainable ones, so the only ones with gradients and AdamW state) stay f32 masters;
- the forward and backward run under bf16 autocast with PEFT's input up-cast switched off, so the
  LoRA path computes in bf16 too instead of copying every activation to f32 (~15% faster, ~300
  MB less activation memory than PEFT's default);
- attention: eager (plain matmuls) for batches up to EAGER_ATTENTION_MAX_LEN positions, where
  it beats the CPU SDPA kernel's backward, SDPA above it (CPU only; CUDA keeps its choice);
- the loss only at target positions, lm_head applied LOSS_CHUNK positions at a time, so f32
  logits exist for one chunk at a time (vocabularies are 49k to 262k); in training the head and
  the cross-entropy are fused, for the SFT loss and the preference step alike (torch_loss.py:
  one exponential pass, the gradient to the hidden states computed in the forward, the head's
  matmul never recomputed);
- packed batches get a block-diagonal causal mask and per-sample positions (no cross-talk);
- gradient checkpointing as an option (recomputes each block's forward: less memory, ~30% slower).

This file holds loading and the training step; scoring, generation and adapter switching are in
torch_inference.py, the device and dtype policy and the reported figures in torch_device.py.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

from mlxft.backends.base import Backend, StepResult
from mlxft.backends.common import (adapted_layer_count, max_grad_norm, resolve_lora_targets, short_name,
                                   split_like)
from mlxft.backends.neftune import add_torch_hook
from mlxft.backends.torch_device import (EAGER_ATTENTION_MAX_LEN, LOSS_CHUNK, SEQ_BUCKET_HALF, TorchDeviceInfo,
                                         pick_device, pick_dtype, pick_inference_weights, torch_loadable)
from mlxft.backends.torch_fast import compile_blocks, install_fused_lora
from mlxft.backends.torch_loss import fusable_head, fused_linear_logp
from mlxft.backends.torch_inference import TorchInference
from mlxft.config import Config
from mlxft.data import Batch
from mlxft.errors import ModelError
from mlxft.tokenizer import load_tokenizer


class TorchBackend(TorchInference, TorchDeviceInfo, Backend):
    name = "torch"

    def __init__(self, cfg: Config, device: str | None = None, world=None):
        super().__init__(cfg, world)
        import torch

        self.torch = torch
        self.device = device or getattr(self.world, "device", None) or pick_device()
        if self.world.local_size > 1 and self.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # Ranks sharing one machine share its cores; oversubscribed threads slow each 10x+.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world.local_size))
        self.dtype = pick_dtype(cfg.train.dtype, self.device)
        self.model = None
        self.optimizer = None
        self._attn_default = None
        self._tuner_layers = []
        self._compiled_blocks = 0  # under train.compile
        # Generation (set by mlxft.inference.load_backend): the dtype asked for the Linear
        # weights (mlxft.decode.weights); then what it resolved to and why.
        self.inference_weights = "float32"
        self.weights_dtype, self.weights_reason = "float32", ""
        self.packed, self.packed_reason = False, ""  # oneDNN-packed copies for batched decode

    # ------------------------------------------------------------------ loading

    def seed(self, value: int) -> None:
        self.torch.manual_seed(value)

    def _load_base(self, model_path: Path) -> None:
        from transformers import AutoModelForCausalLM

        from mlxft.ui import quiet_libraries

        quiet_libraries()
        model_path = torch_loadable(model_path)
        self.model_path = model_path
        self.tokenizer = load_tokenizer(model_path, self.trust_remote_code)
        try:
            base = AutoModelForCausalLM.from_pretrained(
                str(model_path), dtype=self.dtype, trust_remote_code=self.trust_remote_code,
                use_safetensors=True)
        except Exception as exc:
            raise ModelError(f"{model_path}: cannot load model ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
        base.to(self.device)
        base.config.use_cache = False
        for p in base.parameters():
            p.requires_grad_(False)
        self.model = base

    def _attach(self, adapter: Path | None, train: bool) -> None:
        if adapter is None and not train:
            return
        from peft import PeftModel, get_peft_model

        base = self.model
        if adapter is not None and not train and self.dtype == self.torch.float32:
            # Inference: fold the adapter into the f32 weights once instead of running the LoRA
            # side path in every projection at every token (lower-precision weights would round
            # a small adapter away, so those keep it separate).
            self.model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
            return
        if adapter is not None:
            self.model = PeftModel.from_pretrained(base, str(adapter), is_trainable=train)
        else:
            self.model = get_peft_model(base, self._lora_config(base))
        self.model.to(self.device)
        self._attn_default = getattr(base.config, "_attn_implementation", None)
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._tuner_layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        if train:
            install_fused_lora(self._tuner_layers)

    def _prepare_training(self) -> None:
        if self.cfg.train.grad_checkpoint:
            self.model.base_model.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.cfg.train.compile:
            self._compiled_blocks = compile_blocks(self._causal_lm().model.layers)
        if self.cfg.train.neftune_alpha:
            add_torch_hook(self._causal_lm().get_input_embeddings(), self.cfg.train.neftune_alpha)
        self.optimizer = self.torch.optim.AdamW(self._trainable(), lr=self.cfg.train.learning_rate or 0.0,
                                                betas=(0.9, 0.999), eps=1e-8, weight_decay=self.cfg.train.weight_decay)

    def _finish_load(self, train: bool) -> None:
        self.model.train(train)
        if not train and self.device == "cpu":
            from mlxft.decode.layout import column_major

            column_major(self.model)  # faster decode matmuls on CPU (mlxft/decode/layout.py)
        if (not train and self.device == "cpu" and self.dtype == self.torch.float32
                and self.inference_weights != "float32" and not self._tuner_layers):
            from mlxft.decode.weights import store_linear_weights

            self.weights_dtype, self.weights_reason, self.packed, self.packed_reason = pick_inference_weights(
                self.model, self.model_path, self.inference_weights)
            if self.weights_dtype != "float32":
                store_linear_weights(self.model, getattr(self.torch, self.weights_dtype))
            elif self.packed:
                from mlxft.decode.packed import pack_linear_weights

                pack_linear_weights(self.model)

    def _lora_config(self, base):
        from peft import LoraConfig

        lo = self.cfg.lora
        n_layers = base.config.num_hidden_layers
        k = adapted_layer_count(lo.layers, n_layers)
        layers = None if k == n_layers else list(range(n_layers - k, n_layers))
        targets = resolve_lora_targets(list(lo.targets), {short_name(n) for n, _ in base.named_modules()},
                                       self._linear_names(base))
        return LoraConfig(r=lo.rank, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                          target_modules="all-linear" if targets is None else targets,
                          layers_to_transform=layers, use_dora=lo.type == "dora", bias="none",
                          task_type="CAUSAL_LM")

    def _linear_names(self, base) -> set[str]:
        torch = self.torch
        return {short_name(n) for n, m in base.named_modules()
                if isinstance(m, torch.nn.Linear) and "lm_head" not in n}

    # ------------------------------------------------------------------ compute

    def _causal_lm(self):
        from peft import PeftModel

        return self.model.base_model.model if isinstance(self.model, PeftModel) else self.model

    def _trainable(self) -> list:
        """The LoRA/DoRA weights: the only parameters with gradients and optimizer state."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def _autocast_dtype(self):
        torch = self.torch
        return self.dtype if self.dtype in (torch.bfloat16, torch.float16) else None

    @contextlib.contextmanager
    def _compute(self):
        """Training/eval compute: autocast to the base dtype with PEFT's f32 input cast off, so
        LoRA matmuls run in bf16 (gradients still land in the f32 LoRA weights)."""
        dtype = self._autocast_dtype()
        if dtype is None:
            yield
            return
        layers = self._tuner_layers
        saved = [getattr(m, "cast_input_dtype_enabled", True) for m in layers]
        for m in layers:
            m.cast_input_dtype_enabled = False
        try:
            with self.torch.autocast(self.torch.device(self.device).type, dtype=dtype):
                yield
        finally:
            for m, v in zip(layers, saved):
                m.cast_input_dtype_enabled = v

    def _pick_attention(self, length: int) -> str | None:
        """On CPU, eager attention for short batches (its backward is plain matmuls; the CPU SDPA
        kernel's backward costs more below ~160 positions), SDPA above."""
        if self.device != "cpu" or self._attn_default not in ("sdpa", "eager"):
            return self._attn_default
        impl = "eager" if length <= EAGER_ATTENTION_MAX_LEN else "sdpa"
        config = self._causal_lm().config
        if config._attn_implementation != impl:
            config._attn_implementation = impl
        return impl

    def _tensors(self, batch: Batch):
        """(ids, attention mask, target mask, position ids or None) on the device. A padded batch
        computed in bf16/fp16 gets SEQ_BUCKET_HALF's extra pad columns: no target and no attention
        there, so the targets come out in the same order as from the batch's own loss_mask."""
        torch = self.torch
        ids = torch.from_numpy(batch.input_ids).to(self.device)
        attn = torch.from_numpy(batch.attention_mask).to(self.device)
        mask = torch.from_numpy(batch.loss_mask[:, 1:]).to(self.device).bool()
        pos = None if batch.position_ids is None else torch.from_numpy(batch.position_ids).to(self.device)
        extra = -ids.shape[1] % SEQ_BUCKET_HALF
        if extra and self._autocast_dtype() is not None and batch.segment_ids is None and pos is None:
            pad_id = self.tokenizer.pad_token_id or 0
            pad = torch.nn.functional.pad
            ids, attn, mask = pad(ids, (0, extra), value=pad_id), pad(attn, (0, extra)), pad(mask, (0, extra))
        return ids, attn, mask, pos

    def _hidden(self, batch: Batch):
        """Final hidden states at the positions that predict a target, and those targets."""
        torch = self.torch
        ids, attn, mask, pos = self._tensors(batch)
        lm = self._causal_lm()
        impl = self._pick_attention(ids.shape[1])
        kwargs = {"input_ids": ids, "use_cache": False}
        if batch.segment_ids is not None:
            seg = torch.from_numpy(batch.segment_ids).to(self.device)
            kwargs["attention_mask"] = packed_attention_mask(seg, torch.bool if impl == "sdpa" else self.dtype)
            kwargs["position_ids"] = pos
        else:
            kwargs["attention_mask"] = attn
            if pos is not None:
                kwargs["position_ids"] = pos
        out = lm.model(**kwargs)
        hidden = out.last_hidden_state[:, :-1][mask]
        labels = ids[:, 1:][mask]
        return hidden, labels

    def _head(self):
        lm = self._causal_lm()
        head = lm.get_output_embeddings()
        cap = getattr(lm.config, "final_logit_softcapping", None)
        return head, cap

    def _chunk_logits(self, h, head, cap):
        torch = self.torch
        logits = head(h).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _target_logp(self, hidden, labels, need_grad: bool, soft_p=None):
        """Per-position f32 log-probability of each target: the fused head (torch_loss.py) where
        it is the same computation, else lm_head chunk by chunk, each chunk checkpointed under
        autograd so its logits are recomputed in backward instead of kept. With soft targets
        (labels and `soft_p` of shape (N, k)): sum_j soft_p[:, j] log p(labels[:, j])."""
        torch = self.torch
        import torch.nn.functional as F
        from torch.utils.checkpoint import checkpoint

        head, cap = self._head()
        if fusable_head(head, cap):
            return fused_linear_logp(hidden, head.weight, labels, LOSS_CHUNK, soft_p)

        def chunk_logp(h, y, p=None):
            if p is None:
                return -F.cross_entropy(self._chunk_logits(h, head, cap), y, reduction="none")
            return (F.log_softmax(self._chunk_logits(h, head, cap), dim=-1).gather(1, y) * p).sum(dim=1)

        parts = []
        for i in range(0, hidden.shape[0], LOSS_CHUNK):
            h, y = hidden[i:i + LOSS_CHUNK], labels[i:i + LOSS_CHUNK]
            p = None if soft_p is None else soft_p[i:i + LOSS_CHUNK]
            if need_grad and hidden.shape[0] > LOSS_CHUNK:
                parts.append(checkpoint(chunk_logp, h, y, p, use_reentrant=False))
            else:
                parts.append(chunk_logp(h, y, p))
        return torch.cat(parts) if parts else hidden.new_zeros((0,), dtype=torch.float32)

    def _soft_targets(self, batch: Batch):
        """(labels, weights), each (N, k), at the target positions in _hidden's order, or
        (None, None) for a batch with hard targets only."""
        if batch.soft_ids is None:
            return None, None
        torch = self.torch
        mask = torch.from_numpy(batch.loss_mask[:, 1:]).bool()
        ids = torch.from_numpy(batch.soft_ids[:, 1:])[mask].to(self.device)
        return ids, torch.from_numpy(batch.soft_p[:, 1:])[mask].to(self.device)

    def _loss_sum(self, hidden, labels, need_grad: bool, soft=(None, None)):
        """Sum of token cross-entropies (the SFT loss before dividing by the target count);
        `soft` = _soft_targets(batch) where the batch has soft targets."""
        soft_ids, soft_p = soft
        if soft_ids is not None:
            labels = soft_ids
        return -self._target_logp(hidden, labels, need_grad, soft_p).sum()

    def train_step(self, batches: list[Batch], lr: float, n_total: int | None = None) -> StepResult:
        if n_total is None:
            n_total = sum(b.n_targets for b in batches)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_total = 0.0
        for batch in batches:
            with self._compute():
                hidden, labels = self._hidden(batch)
                loss = self._loss_sum(hidden, labels, need_grad=True, soft=self._soft_targets(batch)) / max(n_total, 1)
                loss.backward()
            loss_total += float(loss.detach())
        return self.apply_gradients(loss_total, n_total)

    def apply_gradients(self, loss_total: float, n_targets: int) -> StepResult:
        """The end of every optimizer step (SFT and preference alike), once this rank's gradients
        are accumulated: sum over ranks, clip, and step only when loss and norm are finite."""
        params = self._trainable()
        if self.world.distributed:
            loss_total = self._sum_over_ranks(params, loss_total)
        grad_norm = float(self.torch.nn.utils.clip_grad_norm_(params, max_grad_norm(self.cfg)))
        finite = math.isfinite(loss_total) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=loss_total, n_targets=n_targets, grad_norm=grad_norm, finite=finite)

    def _sum_over_ranks(self, params, loss_total: float) -> float:
        """One all-reduce per optimizer step: every gradient and the loss in a single flat f32
        buffer (LoRA gradients are small, so overlapping buckets with backward as DDP does would
        not pay, and DDP's hooks would not see the chunked loss that bypasses the model's forward)."""
        torch = self.torch
        from torch.nn.utils import parameters_to_vector

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        loss = torch.tensor([loss_total], dtype=torch.float32, device=self.device)
        flat = parameters_to_vector([g.detach().float() for g in [*grads, loss]])
        self.world.all_sum_tensor(flat)
        for p, part in zip(params, split_like(flat, params)):
            p.grad = part.to(p.dtype)
        return float(flat[-1])

    def trainable_finite(self) -> bool:
        torch = self.torch
        params = self._trainable()
        return bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True

    def broadcast_trainable(self) -> None:
        if not self.world.distributed:
            return
        torch = self.torch
        from torch.nn.utils import parameters_to_vector

        params = self._trainable()
        flat = parameters_to_vector([p.detach().float() for p in params])
        self.world.broadcast_tensor(flat)
        with torch.no_grad():
            for p, part in zip(params, split_like(flat, params)):
                p.copy_(part)


    # ------------------------------------------------------------------ files

    def save_adapter(self, path: Path) -> None:
        from mlxft.adapters import write_peft_adapter_dir

        write_peft_adapter_dir(self.model, Path(path))

    def load_adapter_weights(self, adapter: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from mlxft.adapters import WEIGHTS

        set_peft_model_state_dict(self.model, load_file(str(Path(adapter) / WEIGHTS), device=str(self.device)))

    def save_state(self, path: Path) -> None:
        torch = self.torch
        path = Path(path)
        state = {"optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
        if self.device == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save(state, path / "optimizer.pt")

    def load_state(self, path: Path) -> None:
        torch = self.torch
        state = torch.load(Path(path) / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    # ------------------------------------------------------------------ reporting


    def trainable_parameters(self):
        trainable = sum(p.numel() for p in self._trainable())
        total = sum(p.numel() for p in self.model.parameters())
        return trainable, total


def packed_attention_mask(segment_ids, dtype):
    """4-D mask (B, 1, T, T): causal within a sample, blocked across samples and padding. Boolean
    (True = may attend) when dtype is torch.bool, for SDPA; else additive (0 / dtype min)."""
    import torch

    seg = segment_ids
    t = seg.shape[1]
    causal = torch.ones((t, t), dtype=torch.bool, device=seg.device).tril()
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
    allowed = same & causal[None]
    # Padding rows attend to themselves so softmax never sees an all-masked row.
    eye = torch.eye(t, dtype=torch.bool, device=seg.device)[None]
    allowed = allowed | (eye & (seg[:, :, None] == 0))
    if dtype == torch.bool:
        return allowed[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
