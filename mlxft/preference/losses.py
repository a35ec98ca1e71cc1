"""The DPO and ORPO objectives on per-answer log-probabilities, written once for PyTorch tensors
and MLX arrays (plain arithmetic plus the two functions each backend passes in `ops`).

Inputs per pair: the policy's summed log-probability of the chosen and rejected answer tokens
(`pc`, `pr`), their token counts (`nc`, `nr`) and, for DPO, the reference's sums (`rc`, `rr`).

DPO (Rafailov et al. 2023), sigmoid loss with conservative label smoothing eps (cDPO):
    delta  = (pc - rc) - (pr - rr)
    loss   = -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)
    reward = beta (p - r) per answer; margin = reward_chosen - reward_rejected
With eps = 0 this is TRL DPOTrainer's `loss_type="sigmoid"`. With `sft_weight` w > 0 the chosen
answers' NLL (per answer token, over the step) is added with weight w: TRL 1.16's
`loss_type=["sigmoid", "sft"]` with `loss_weights=[1, w]`, the RPO paper's `rpo_alpha` (Pang et
al. 2024). DPO alone can satisfy its margin by pushing the rejected answer down while the chosen
one barely rises; the NLL term makes the chosen answer itself more likely.

ORPO (Hong et al. 2024), with mean per-token log-probabilities mc = pc / nc, mr = pr / nr:
    log_odds = (mc - mr) - (log(1 - exp(mc)) - log(1 - exp(mr)))
    loss     = NLL of the chosen answer tokens (per token) - beta mean log sigmoid(log_odds)
    reward   = beta m per answer
`beta` is the weight the paper calls lambda, named as TRL's ORPOTrainer names it. TRL's NLL
term covers the prompt tokens of the chosen sequence as well; mlxft's covers the answer only,
as every mlxft objective does (the paper's L_SFT is on the response).

Replay (`data.replay`): the base model's own answers, trained as NLL only (they have no rejected
answer, so no DPO/ORPO term): their summed NLL over the step's replay answer tokens, weight 1,
the same per-token scale as ORPO's NLL term.

Step losses are sums over the pairs of a micro-batch divided by the whole step's pair count
(and, for the NLL terms, its chosen-answer or replay token count), so gradient accumulation and
data parallel ranks add up to the loss of the whole batch, as SFT's per-token normalisation does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LN_HALF = -math.log(2.0)


@dataclass
class Objective:
    method: str                 # dpo | orpo
    beta: float
    label_smoothing: float = 0.0
    sft_weight: float = 0.0     # DPO: weight of the chosen NLL term (ORPO's is part of its loss, 1)

    @property
    def needs_reference(self) -> bool:
        return self.method == "dpo"

    @property
    def nll_weight(self) -> float:
        """Weight of the chosen answers' per-token NLL in the step loss."""
        return 1.0 if self.method == "orpo" else self.sft_weight

    def pair_terms(self, ops, pc, pr, nc, nr, rc=None, rr=None):
        """(per-pair preference loss, chosen reward, rejected reward)."""
        if self.method == "dpo":
            chosen, rejected = self.beta * (pc - rc), self.beta * (pr - rr)
            margin = chosen - rejected
            eps = self.label_smoothing
            loss = -(1 - eps) * ops.logsigmoid(margin)
            if eps:
                loss = loss - eps * ops.logsigmoid(-margin)
            return loss, chosen, rejected
        mc, mr = pc / nc, pr / nr
        log_odds = (mc - mr) - (ops.log1mexp(mc) - ops.log1mexp(mr))
        return -self.beta * ops.logsigmoid(log_odds), self.beta * mc, self.beta * mr

    def step_loss(self, ops, pc, pr, nc, nr, rc, rr, n_pairs: int, n_chosen_tokens: int):
        """This micro-batch's share of the step loss, and the per-pair rewards (chosen, rejected)."""
        pair_loss, chosen, rejected = self.pair_terms(ops, pc, pr, nc, nr, rc, rr)
        loss = pair_loss.sum() / max(n_pairs, 1)
        if self.nll_weight:
            loss = loss - self.nll_weight * pc.sum() / max(n_chosen_tokens, 1)
        return loss, chosen, rejected

    @staticmethod
    def replay_loss(replay_logps, n_replay_tokens: int):
        """This micro-batch's share of the replay NLL: summed log-probabilities of its replay rows
        over the whole step's replay answer tokens."""
        return -replay_logps.sum() / max(n_replay_tokens, 1)


class TorchOps:
    @staticmethod
    def logsigmoid(x):
        import torch.nn.functional as F

        return F.logsigmoid(x)

    @staticmethod
    def log1mexp(x):
        """log(1 - exp(x)) for x < 0, branching at -ln 2 to avoid cancellation (Maechler 2012)."""
        import torch

        return torch.where(x < LN_HALF, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class MLXOps:
    @staticmethod
    def logsigmoid(x):
        import mlx.core as mx

        return -mx.logaddexp(mx.zeros_like(x), -x)

    @staticmethod
    def log1mexp(x):
        import mlx.core as mx

        return mx.where(x < LN_HALF, mx.log1p(-mx.exp(x)), mx.log(-mx.expm1(x)))
