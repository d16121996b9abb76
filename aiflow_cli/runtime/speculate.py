"""Self-speculative greedy decoding across tiers: the driving tier drafts with its own layers, the tiers behind it
verify every draft in one message per link.

The driver (the device, holding stages ``[0:k]`` with the embedding) has an *early exit*: the output of its last
block through the model's own final norm and (tied) LM head, the ``head`` stage loaded beside its stages. One
round, with ``g`` drafts:

1. the driver crops its KV cache to ``L`` (the committed length: prompt + accepted tokens), then runs the pending
   token ``x`` (the last one accepted, not yet in any cache) and ``g`` drafts through its stages one position at a
   time, each draft the exit's greedy token after the previous position: the KV entries it writes are exactly the
   ones the full model needs for positions that get accepted, so they are kept, not recomputed;
2. it sends the ``g + 1`` positions' boundary state in ONE :class:`~aiflow_cli.runtime.protocol.Verify` message
   per link; every tier behind crops its cache to ``L`` (dropping the previous round's rejected drafts:
   idempotent), runs all positions at once, and the output tier answers with the full model's greedy token after
   each position;
3. the longest prefix of drafts that matches is accepted, plus the full model's token after it (a correction, or
   a bonus token when every draft matched): ``1 .. g + 1`` tokens per round trip. ``L`` grows by the accepted
   drafts + 1.

Greedy output is the full model's greedy output token for token (each emitted token is the full model's argmax
after a prefix of emitted tokens); only the number of round trips changes. The request's end (``max_new_tokens``
or an end-of-sequence token) is applied to each round's tokens by every tier alike (:func:`emitted`), so no token
past it is emitted and every tier frees its session on the round that ends it.

What drafts is the driver's drafter (:mod:`aiflow_cli.runtime.drafters`): the exit above (untrained), the same
through a trained exit adapter (``aiflow draft train``), or a separate draft model; it only proposes tokens.

``speculate=K`` drafts ``K`` tokens per round; ``speculate="auto"`` picks ``g`` each round to maximise the expected
tokens per second, from the acceptance rate observed so far (per-draft, decayed) and the measured costs: the
driver's time per position, the verify round trip's fixed part and the upstream compute per position; when it
drafts nothing it still sends one draft now and then to re-measure the acceptance.
Speculation applies to one sequence at a time (batch 1) on LMs whose attention keeps every position (no sliding
window); other requests run the plain decode loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch

from aiflow_cli.errors import InputError, TransportError
from aiflow_cli.models.sampling import GREEDY, Sampling
from aiflow_cli.models.state import BoundaryState
from aiflow_cli.runtime.protocol import VERIFY, Verify
from aiflow_cli.runtime.timings import Timings

if TYPE_CHECKING:
    from aiflow_cli.models import StagedModel
    from aiflow_cli.runtime.node import StepResult, TierNode
    from aiflow_cli.runtime.sessions import Session, SessionKey

#: Most drafts per round ``auto`` considers, and what it starts with before it has observed anything.
AUTO_MAX = 12
AUTO_START = 4
#: Most drafts per round a fixed ``K`` may ask for.
MAX_K = 32
#: Weight of older rounds in the acceptance and cost estimates of ``auto`` (per round).
DECAY = 0.9
#: When ``auto`` drafts nothing, its acceptance evidence decays; below this many (decayed) drafts it sends one
#: draft to measure acceptance again (about once per 20 rounds), so an early unlucky estimate is not final.
PROBE_EVIDENCE = 1.0

Speculate = Union[int, str, None]


def parse_speculate(value: Speculate) -> Speculate:
    """``K`` (drafts per round, 1..MAX_K), ``"auto"``, or None/0/"off" (no speculation); one-line error else."""
    if value is None or value == 0 or (isinstance(value, str) and value.strip().lower() in ("", "0", "off", "none")):
        return None
    if isinstance(value, str):
        v = value.strip().lower()
        if v == "auto":
            return "auto"
        try:
            value = int(v)
        except ValueError:
            raise InputError(
                f"speculate={value!r}: give a number of drafts K (1..{MAX_K}) or auto", param="speculate"
            ) from None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_K:
        raise InputError(f"speculate={value!r}: give a number of drafts K (1..{MAX_K}) or auto", param="speculate")
    return value


def unsupported(model: "StagedModel") -> Optional[str]:
    """Why ``model`` cannot self-speculate (None when it can): an LM whose last stage is its head and whose
    KV cache keeps every position (a sliding-window cache cannot be cropped back by position)."""
    if model.task != "generate":
        return f"{model.name} ({model.task}) is not a language model"
    if model.stages[-1].kind != "head":
        return f"{model.name} has no head stage to exit through"
    cfg = model.adapter.config
    types = getattr(cfg, "layer_types", None)  # as the decoder family reads them: without types, sliding_window
    if ("sliding_attention" in types) if types else getattr(cfg, "sliding_window", None) is not None:
        return f"{model.name} uses sliding-window attention, whose KV cache cannot be rolled back by position"
    return None


# -- what a round emits (the same function on every tier) ---------------------------------------------------------
def accepted(draft: Sequence[int], targets: Sequence[int]) -> int:
    """How many drafts match the full model's greedy tokens (``targets[i]`` follows position ``i``); at most
    ``len(targets) - 1``, so a token follows them (an edge pre-check may have verified fewer positions than
    drafted: :mod:`aiflow_cli.runtime.precheck`)."""
    n = 0
    while n < len(draft) and n < len(targets) - 1 and draft[n] == targets[n]:
        n += 1
    return n


def emitted(draft: Sequence[int], targets: Sequence[int], remaining: int, eos: frozenset[int]) -> list[int]:
    """The tokens a round emits: the accepted drafts and the full model's token after them, cut after the first
    end-of-sequence token and at ``remaining`` tokens."""
    n = accepted(draft, targets)
    out = list(draft[:n]) + [int(targets[n])]
    for i, t in enumerate(out):
        if t in eos:
            out = out[: i + 1]
            break
    return out[: max(0, remaining)]


def round_ends(verify: Verify, tokens: Optional[torch.Tensor], eos: frozenset[int]) -> bool:
    """Whether the round answered by ``tokens`` ([1, g+1]) ends the request (its last token, or an EOS)."""
    if tokens is None:
        return False
    out = emitted(verify.draft, tokens[0].tolist(), verify.remaining, eos)
    return len(out) >= verify.remaining or any(t in eos for t in out)


def join_positions(states: Sequence[BoundaryState]) -> BoundaryState:
    """The boundary states of consecutive single positions as one state of all positions: tensors along the
    sequence (dim 1), except the attention mask, which already covers every position in the last state."""
    last = states[-1]
    return {k: (v if k == "attention_mask" else torch.cat([s[k] for s in states], dim=1)) for k, v in last.items()}


# -- choosing the number of drafts ------------------------------------------------------------------------------
def expected_tokens(alpha: float, g: int) -> float:
    """Expected tokens a round emits with ``g`` drafts when each is accepted with probability ``alpha`` (given
    the ones before it): 1 + alpha + ... + alpha^g."""
    return sum(alpha**i for i in range(g + 1))


@dataclass
class SpecPolicy:
    """How many drafts each round sends: a fixed ``k``, or ``"auto"`` (see the module docstring). One per
    driving pipeline; what ``auto`` has learnt carries over between requests."""

    k: Union[int, str] = "auto"
    k_max: int = AUTO_MAX
    # auto's estimates: decayed counts of accepted / rejected drafts, and costs (ms, EWMA)
    hits: float = 0.0
    misses: float = 0.0
    draft_ms: Optional[float] = None
    """Driver time per position (its stages + the exit)."""
    fixed_ms: Optional[float] = None
    """Verify round trip less the upstream compute: propagation, serialisation, framing."""
    per_position_ms: Optional[float] = None
    """Upstream compute per verified position."""
    precheck: bool = False
    """Ask the middle tier to pre-check greedy rounds with its own exit (:mod:`aiflow_cli.runtime.precheck`)."""

    def __post_init__(self) -> None:
        k = parse_speculate(self.k)
        if k is None:
            raise InputError("speculate: a policy needs K >= 1 or auto", param="speculate")
        self.k = k

    @property
    def alpha(self) -> float:
        """Estimated per-draft acceptance (a uniform prior: 0.5 before any round)."""
        return (self.hits + 1.0) / (self.hits + self.misses + 2.0)

    def round_ms(self, g: int) -> float:
        """Predicted time of a round with ``g`` drafts (ms)."""
        return (g + 1) * ((self.draft_ms or 0.0) + (self.per_position_ms or 0.0)) + (self.fixed_ms or 0.0)

    def choose(self) -> int:
        if isinstance(self.k, int):
            return self.k
        if self.fixed_ms is None:
            return AUTO_START
        a = self.alpha
        g = max(range(self.k_max + 1), key=lambda g: expected_tokens(a, g) / max(self.round_ms(g), 1e-6))
        if g == 0 and self.hits + self.misses < PROBE_EVIDENCE:
            return 1  # what was learnt about acceptance has faded: one draft to measure it again
        return g

    def draft_len(self, remaining: int) -> int:
        """Drafts for the next round when ``remaining`` tokens may still be emitted (never more than fit)."""
        return max(0, min(self.choose(), remaining - 1))

    def observe(self, drafted: int, n_accepted: int, draft_ms: float, verify_ms: float, upstream_ms: float) -> None:
        """Learns from one round: ``drafted`` drafts of which ``n_accepted`` matched, the driver's time
        ``draft_ms`` for its ``drafted + 1`` positions, the verify round trip ``verify_ms`` and the upstream
        compute in it ``upstream_ms``."""
        self.hits = DECAY * self.hits + n_accepted
        self.misses = DECAY * self.misses + (1 if n_accepted < drafted else 0)
        positions = drafted + 1

        def ewma(old: Optional[float], new: float) -> float:
            return new if old is None else DECAY * old + (1 - DECAY) * new

        self.draft_ms = ewma(self.draft_ms, draft_ms / positions)
        self.per_position_ms = ewma(self.per_position_ms, upstream_ms / positions)
        self.fixed_ms = ewma(self.fixed_ms, max(0.0, verify_ms - upstream_ms))

    def to_json(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "alpha": round(self.alpha, 4),
            "draft_ms_per_position": None if self.draft_ms is None else round(self.draft_ms, 3),
            "fixed_ms": None if self.fixed_ms is None else round(self.fixed_ms, 3),
            "upstream_ms_per_position": None if self.per_position_ms is None else round(self.per_position_ms, 3),
            "next_drafts": self.choose(),
            **({"precheck": True} if self.precheck else {}),
        }


@dataclass
class SpecStats:
    """One request's speculation: verify rounds, drafts sent and accepted, tokens emitted by the rounds."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    verified: int = 0
    """Drafts the output tier verified: fewer than ``drafted`` when an edge pre-check cut rounds."""
    tokens: int = 0
    drafts_per_round: list[int] = field(default_factory=list)
    policy: dict[str, Any] = field(default_factory=dict)
    """The policy's state after the request (:meth:`SpecPolicy.to_json`): what ``auto`` has learnt."""

    @property
    def acceptance(self) -> Optional[float]:
        return self.accepted / self.drafted if self.drafted else None

    def to_json(self) -> dict[str, Any]:
        acc = self.acceptance
        return {
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "verified": self.verified,
            "acceptance": None if acc is None else round(acc, 4),
            "tokens": self.tokens,
            "tokens_per_round": round(self.tokens / self.rounds, 3) if self.rounds else None,
            "drafts_per_round": self.drafts_per_round,
            "policy": self.policy,
        }


# -- the driver's loop ----------------------------------------------------------------------------------------------
def drive(
    node: "TierNode",
    key: "SessionKey",
    session: "Session",
    first: "StepResult",
    max_new_tokens: int,
    deadline: float,
    policy: SpecPolicy,
    sampling: Sampling = GREEDY,
) -> "StepResult":
    """The decode loop of a driving tier with self-speculation (see the module docstring); ``first`` is the
    prefill's result (its token is the first one emitted). With ``sampling`` (temperature > 0) each draft is drawn
    from the drafter's distribution and the output tier applies the rejection rule (:mod:`aiflow_cli.models.sampling`)."""
    from aiflow_cli.runtime.drafters import ExitDrafter
    from aiflow_cli.runtime.node import StepResult

    model = node.model
    eos = model.eos_token_ids
    timings = first.timings
    assert first.tokens is not None  # a generating model's prefill
    out: list[int] = [int(first.tokens[0, 0])]
    stats = SpecStats()
    base = session.step_inputs  # the input of the last committed position: its mask covers the cache
    cache_len = int(base["attention_mask"].shape[1])
    drafter = (getattr(node, "drafter", None) or ExitDrafter()).start(node, base)  # where drafts come from
    while len(out) < max_new_tokens and out[-1] not in eos:
        remaining = max_new_tokens - len(out)
        g = policy.draft_len(remaining)
        round_t = Timings()
        mine = round_t.tier(node.tier)
        session = node.sessions.get(key)  # (LimitExceeded if another request's cache evicted it)
        session.cache.crop(cache_len)  # the previous round's rejected drafts
        t_draft = time.perf_counter()
        inputs, joined, draft, dists = drafter.propose(node, session.cache, base, out[-1], g, mine, sampling, len(out))
        draft_ms = (time.perf_counter() - t_draft) * 1e3
        payload = node.pack(joined, node.stages.stop - 1, mine)  # the codec of the driver's cut
        verify = Verify("", node.tier, node.stages.stop, (), cache_len, tuple(draft), remaining)
        verify.precheck = policy.precheck and sampling.greedy
        if not sampling.greedy:
            verify.temperature, verify.top_k, verify.top_p = sampling.temperature, sampling.top_k, sampling.top_p
            verify.seed, verify.index, verify.dists = sampling.seed, len(out), tuple(dists)
        t_verify = time.perf_counter()
        r = node._forward(key, VERIFY, node.stages.stop, payload, 0, False, deadline, round_t, verify=verify)
        verify_ms = (time.perf_counter() - t_verify) * 1e3
        if r.tokens is None:
            raise TransportError(f"{node.tier}: the verify reply carried no tokens")
        targets = r.tokens[0].tolist()
        if not 1 <= len(targets) <= g + 1:
            raise TransportError(f"{node.tier}: the verify reply has {len(targets)} tokens for {g + 1} positions")
        n = accepted(draft, targets)
        new = emitted(draft, targets, remaining, eos)
        upstream_ms = sum(t.compute_ms for name, t in r.timings.tiers.items() if name != node.tier)
        policy.observe(g, n, draft_ms, verify_ms, upstream_ms)
        stats.rounds += 1
        stats.drafted += g
        stats.accepted += n
        stats.verified += len(targets) - 1
        stats.tokens += len(new)
        stats.drafts_per_round.append(g)
        drafter.commit(out[-1], new)
        out += new
        timings.merge(r.timings)
        base = inputs[n]  # positions x, d1..dn are committed everywhere
        cache_len += n + 1
        session.step_inputs = base
        session.cache.crop(cache_len)
        node.sessions.done_step(key, session)  # accounts the cache (the memory limit applies as in plain decoding)
    stats.policy = dict(policy.to_json(), **drafter.describe())
    return StepResult(tokens=torch.tensor([out], dtype=torch.long), timings=timings, spec=stats)


# -- measuring an exit ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def exit_acceptance(model: "StagedModel", inputs: BoundaryState, exits: Sequence[int], tokens: int) -> dict[int, float]:
    """Per exit stage ``e`` (the last stage the driver would hold): the share of the full model's greedy tokens
    that the early exit after stage ``e`` predicts from the same prefix (teacher-forced: the per-draft acceptance
    of self-speculation with the exit there). ``model`` needs every stage loaded; batch 1."""
    full = model.generate(inputs, tokens)
    seq = torch.cat([inputs["input_ids"], full], dim=1)
    mask = torch.ones_like(seq)
    pos = torch.arange(seq.shape[1]).unsqueeze(0)
    state: BoundaryState = {"input_ids": seq, "attention_mask": mask, "position_ids": pos}
    p = inputs["input_ids"].shape[1]
    want = full[0, : full.shape[1]]
    head = model.num_stages - 1
    out: dict[int, float] = {}
    wanted = set(exits)
    for i in range(head):
        state = model.run_stage(i, state)
        if i in wanted:
            logits = model.output(model.run_stage(head, {"hidden_states": state["hidden_states"]}))
            guess = logits[0, p - 1 : p - 1 + want.shape[0]].argmax(-1)
            out[i] = float((guess == want).float().mean())
    return out
