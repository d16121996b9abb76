"""Sampling the next token, reproducibly wherever it happens, and the speculative-sampling rejection rule.

A :class:`Sampling` (temperature, top-k, top-p, seed) turns a row of logits into the distribution the user asked
for (:func:`target_probs`); a token is drawn from it by inverse CDF with a uniform number that is a pure function
of ``(seed, index, row, purpose)`` (:func:`uniform`: a counter-based generator, splitmix64), where ``index`` is the
token's place in the generated answer. No generator state travels or survives between steps, so the same seed
gives the same tokens whichever tier samples (the output tier of any plan, or the model alone:
:meth:`aiflow_cli.models.staged.StagedModel.generate`), after a KV-cache rollback, or after a failover that
replays a session. ``temperature == 0`` is greedy decoding (argmax) and ignores the rest.

Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): the driver draws each draft ``d_i`` from its own
distribution ``q_i`` and sends ``q_i`` with it; the verifier, with the full model's distribution ``p_i``, accepts
``d_i`` with probability ``min(1, p_i(d_i) / q_i(d_i))``; at the first rejection it draws from the residual
``max(0, p_i - q_i)`` (normalised) and stops; when every draft is accepted it draws a bonus token from
``p_g``. Every emitted token is then distributed exactly as sampling from the full model token by token.
The driver's ``q`` is its exit's distribution cut to its :data:`DRAFT_SUPPORT` most likely tokens (renormalised):
any ``q`` keeps the rule exact, and a short support keeps the message small (ids + probabilities, not a vocabulary
of floats per draft). :func:`verify_round` answers in the shape greedy verification does (the token after each
position: a draft itself where it is accepted), so the round's bookkeeping is the same for both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from aiflow_cli.errors import InputError

#: Tokens in a draft distribution's support (the driver's most likely ones).
DRAFT_SUPPORT = 32
#: What a uniform number is for, so the draws of one position never reuse each other's numbers.
TOKEN, DRAFT, ACCEPT, RESIDUAL = 1, 2, 3, 4
_MASK = (1 << 64) - 1
#: Largest seed (it travels as a signed 64-bit field).
MAX_SEED = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class Sampling:
    """How the next token is chosen: ``temperature`` 0 is greedy; else softmax(logits / temperature) cut to the
    ``top_k`` most likely tokens (0: all) and to the smallest set whose probability reaches ``top_p`` (1: all),
    drawn with ``seed``."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        t, k, p, s = self.temperature, self.top_k, self.top_p, self.seed
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 <= t <= 100:
            raise InputError(f"temperature={t!r}: give a number in 0..100 (0: greedy)", param="temperature")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InputError(f"top_k={k!r}: give a whole number >= 0 (0: no cut)", param="top_k")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise InputError(f"top_p={p!r}: give a number in (0, 1] (1: no cut)", param="top_p")
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
            raise InputError(f"seed={s!r}: give a whole number in 0..2^63-1", param="seed")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def uniform(seed: int, index: int, row: int, purpose: int) -> float:
    """A uniform number in [0, 1) that depends only on its arguments (53 random bits)."""
    x = _splitmix64(seed & _MASK)
    for v in (index, row, purpose):
        x = _splitmix64(x ^ (v & _MASK))
    return (x >> 11) / float(1 << 53)


def target_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The distribution ``s`` samples from, per row of ``logits`` ([..., V]) as float64 (greedy: one-hot argmax)."""
    x = logits.detach().to(torch.float64)
    if s.greedy:
        return torch.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).to(torch.float64)
    x = x / s.temperature
    if 0 < s.top_k < x.shape[-1]:
        kth = torch.topk(x, s.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    p = torch.softmax(x, dim=-1)
    if s.top_p < 1:
        sp, idx = torch.sort(p, dim=-1, descending=True)
        before = torch.cumsum(sp, dim=-1) - sp  # probability of the tokens ranked above each one
        sp = sp.masked_fill(before >= s.top_p, 0.0)  # keep the smallest prefix that reaches top_p
        p = torch.zeros_like(p).scatter(-1, idx, sp)
        p = p / p.sum(-1, keepdim=True)
    return p


def draw(p: torch.Tensor, u: float) -> int:
    """The token at ``u`` of the distribution ``p`` ([V], float64) by inverse CDF (never one of probability 0)."""
    c = torch.cumsum(p, dim=0)
    i = int(torch.searchsorted(c, torch.tensor([u * float(c[-1])], dtype=c.dtype), right=True)[0])
    i = min(i, p.shape[0] - 1)
    while p[i] <= 0 and i > 0:  # u landed on the last cumulative value (rounding): the last token with mass
        i -= 1
    return i


def sample(logits: torch.Tensor, s: Sampling, index: int) -> torch.Tensor:
    """The next token per row of ``logits`` ([B, V]) -> [B]: argmax when greedy, else a draw with the uniform of
    ``(s.seed, index, row)``; ``index``: the token's place in the answer (0: the first generated token)."""
    if s.greedy:
        return logits.argmax(-1)
    p = target_probs(logits, s)
    return torch.tensor([draw(p[r], uniform(s.seed, index, r, TOKEN)) for r in range(p.shape[0])], dtype=torch.long)


# -- speculative sampling -----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DraftDist:
    """A draft's distribution as the driver sampled from it: ``probs[j]`` of token ``ids[j]``, 0 elsewhere."""

    ids: tuple[int, ...]
    probs: tuple[float, ...]

    def prob(self, token: int) -> float:
        try:
            return self.probs[self.ids.index(token)]
        except ValueError:
            return 0.0

    def dense(self, vocab: int) -> torch.Tensor:
        q = torch.zeros(vocab, dtype=torch.float64)
        q[list(self.ids)] = torch.tensor(self.probs, dtype=torch.float64)
        return q


def draft_dist(logits: torch.Tensor, s: Sampling, support: int = DRAFT_SUPPORT) -> DraftDist:
    """The driver's draft distribution from its exit's ``logits`` ([V]): ``s``'s distribution cut to its
    ``support`` most likely tokens, renormalised."""
    p = target_probs(logits, s)
    top = torch.topk(p, min(support, p.shape[-1]))
    keep = top.values > 0
    vals = top.values[keep]
    vals = vals / vals.sum()
    return DraftDist(tuple(int(i) for i in top.indices[keep]), tuple(float(v) for v in vals))


def draft_token(q: DraftDist, s: Sampling, index: int) -> int:
    """The draft at answer place ``index`` drawn from ``q``."""
    c, u = 0.0, uniform(s.seed, index, 0, DRAFT)
    total = math.fsum(q.probs)
    for i, p in zip(q.ids, q.probs):
        c += p
        if u * total < c:
            return i
    return q.ids[-1]


def verify_round(
    logits: torch.Tensor, draft: Sequence[int], dists: Sequence[DraftDist], s: Sampling, first_index: int
) -> list[int]:
    """The verifier's answer to one round: ``logits`` ([g + 1, V]) of the full model after each position,
    ``draft`` (g tokens) drawn from ``dists``; ``first_index``: the answer place of the first draft. Returns
    g + 1 tokens: each accepted draft itself, then at the first rejection the residual's draw (never the draft),
    or after all g the bonus draw; positions after a rejection repeat that draw (they are never read)."""
    if len(dists) != len(draft):
        raise ValueError(f"{len(draft)} drafts but {len(dists)} draft distributions")
    p = target_probs(logits, s)
    out: list[int] = []
    for i, (d, q) in enumerate(zip(draft, dists)):
        idx = first_index + i
        qd = q.prob(d)
        if qd > 0 and uniform(s.seed, idx, 0, ACCEPT) * qd < float(p[i, d]):
            out.append(int(d))
            continue
        resid = (p[i] - q.dense(p.shape[-1])).clamp_min(0.0)
        if float(resid.sum()) <= 0:  # p == q exactly (rounding): the draft's own distribution
            resid = p[i]
        tok = draw(resid, uniform(s.seed, idx, 0, RESIDUAL))
        return out + [tok] * (len(draft) + 1 - len(out))
    out.append(draw(p[len(draft)], uniform(s.seed, first_index + len(draft), 0, TOKEN)))
    return out


def check_dists(dists: Sequence[DraftDist], vocab: Optional[int] = None) -> None:
    """Raises ValueError naming what is wrong with draft distributions from a peer."""
    for q in dists:
        if len(q.ids) != len(q.probs) or not q.ids or len(q.ids) > 4 * DRAFT_SUPPORT:
            raise ValueError("each draft distribution needs 1..128 (id, probability) pairs")
        if len(set(q.ids)) != len(q.ids) or any(i < 0 or (vocab is not None and i >= vocab) for i in q.ids):
            raise ValueError("draft distribution ids must be distinct token ids")
        if any(not (0.0 <= p <= 1.0) for p in q.probs) or abs(math.fsum(q.probs) - 1.0) > 1e-6:
            raise ValueError("draft distribution probabilities must be in [0, 1] and sum to 1")
