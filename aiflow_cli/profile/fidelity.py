"""Fidelity in the task's own metric: what a codec at a cut does to the answer a user gets.

Metrics (``Calibration.metric``), each per calibration item, then mean and min over items:

- ``token_agreement`` (generation, captioning): share of generated positions whose token equals the exact model's
  greedy token. The profiler measures it *teacher-forced* (:class:`Reference`): the prompt plus the exact greedy
  continuation go through the model in one forward, and the argmax at each continuation position is compared
  with the exact model's at the same position; it also reports next-token KL. The plan verifier measures it
  *free-running* (greedy generation with the codecs in place, :func:`token_agreement` of the two sequences).
- ``embedding_cosine`` (sentence embeddings): cosine of the pooled embedding with the reference implementation's
  (sentence-transformers ``encode()`` for sentence-transformers models, else the exact model).
- ``label_agreement`` (classifiers): 1 when the top class equals the exact model's, else 0.
- ``output_cosine`` (models that take no text or image, e.g. fx): cosine of the end output rows on random inputs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from aiflow_cli.errors import InputError
from aiflow_cli.models import BoundaryState, StagedModel
from aiflow_cli.profile.calibration import (
    DEFAULT_TOKENS,
    calibration_items,
    load_calibration,
    metric_for,
    raw_items,
)
from aiflow_cli.profile.schema import Fidelity

#: Keys of a text prompt that grow with every generated token (right-padded when items are batched).
TEXT_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
#: Random rows scored for ``output_cosine`` (models without calibration inputs).
RANDOM_ITEMS = 4


def cache_root() -> Path:
    """``$AIFLOW_CACHE_DIR/fidelity`` (default ``~/.cache/aiflow/fidelity``): references and verifications."""
    return Path(os.environ.get("AIFLOW_CACHE_DIR", Path.home() / ".cache" / "aiflow")) / "fidelity"


def token_agreement(tokens: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of generated positions where two token sequences ([B, n] or [n]) agree, over the longer of the two:
    a sequence that stopped early at its end-of-sequence token disagrees at every position it did not generate."""
    a, b = tokens.reshape(-1, tokens.shape[-1]), reference.reshape(-1, reference.shape[-1]).to(tokens.device)
    if a.shape[0] != b.shape[0]:
        raise InputError(
            f"token sequences of shapes {list(tokens.shape)} and {list(reference.shape)} cannot be compared"
        )
    n = max(a.shape[1], b.shape[1])
    if n == 0:
        return 1.0
    a, b = (torch.nn.functional.pad(t, (0, n - t.shape[1]), value=-1) for t in (a, b))
    return float((a == b).float().mean())


def embedding_cosine(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Lowest cosine between matching rows of two [B, H] outputs (one row per input), in float64."""
    a = output.reshape(output.shape[0], -1).double()
    b = reference.reshape(reference.shape[0], -1).double().to(a.device)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12).min())


def output_fidelity(metric: str, output: torch.Tensor, reference: torch.Tensor) -> float:
    """One request's fidelity in ``metric``: generated ids against the reference ids (token metrics), or the
    output against the reference output (cosine metrics; label agreement compares argmax)."""
    if metric == "token_agreement":
        return token_agreement(output, reference)
    if metric == "label_agreement":
        return float((output.argmax(-1) == reference.to(output.device).argmax(-1)).float().mean())
    return embedding_cosine(output, reference)


# -- batching calibration items --------------------------------------------------------------------------------
def pad_batch(items: list[BoundaryState]) -> tuple[BoundaryState, list[int]]:
    """Stacks batch-1 items into one batch: text keys right-padded (mask 0, positions continuing), every other
    tensor concatenated on dim 0. Returns the batch and each item's text length."""
    if not items:
        raise InputError("no calibration items")
    keys = list(items[0])
    if any(list(it) != keys for it in items):
        raise InputError("calibration items have different boundary tensors")
    lengths = [int(it["input_ids"].shape[1]) if "input_ids" in it else 0 for it in items]
    width = max(lengths)
    out: BoundaryState = {}
    for k in keys:
        if k in TEXT_KEYS:
            rows = []
            for it in items:
                t = it[k]
                pad = width - t.shape[1]
                if k == "position_ids":
                    extra = t[:, -1:] + torch.arange(1, pad + 1, device=t.device)
                else:
                    extra = torch.zeros(t.shape[0], pad, dtype=t.dtype, device=t.device)
                rows.append(torch.cat([t, extra], dim=1))
            out[k] = torch.cat(rows, dim=0)
        else:
            out[k] = torch.cat([it[k] for it in items], dim=0)
    return out, lengths


def _cached_json(path: Path, compute):
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass  # a damaged cache entry is recomputed
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)
    return value


def greedy_references(m: StagedModel, items: list[BoundaryState], tokens: int) -> list[list[int]]:
    """The exact model's greedy continuation of each item (batch 1, as the runtime generates), cached on disk per
    (model hash, calibration set, item count, tokens)."""
    cal = load_calibration()
    key = f"{m.model_hash[:16]}-{cal.hash}-n{len(items)}-t{tokens}-{str(m.dtype).removeprefix('torch.')}"
    return _cached_json(
        cache_root() / "references" / f"{key}.json", lambda: [m.generate(it, tokens)[0].tolist() for it in items]
    )


# -- the reference a profile is scored against ------------------------------------------------------------------
@dataclass
class Reference:
    """The exact model on the calibration batch, and how a coded run's end output is scored against it.

    ``inputs``: the batched stage-0 input. Generation: ``positions`` [B, T] are the output positions compared,
    ``exact`` the exact log-probabilities there [B, T, V] and ``target`` the exact argmax [B, T]. Embeddings:
    ``target`` is the reference implementation's embeddings [B, H]. Classifiers and ``output_cosine``: ``exact``
    is the exact output."""

    metric: str
    inputs: BoundaryState
    items: int
    tokens: Optional[int] = None
    positions: Optional[torch.Tensor] = None
    exact: Optional[torch.Tensor] = None
    target: Optional[torch.Tensor] = None
    reference: str = "the exact model"
    reference_min: Optional[float] = None
    exact_fidelity: Optional[Fidelity] = None
    greedy: Optional[torch.Tensor] = None
    """Generation: the exact model's free-running greedy tokens [B, T] (batch 1 each; -1 after an early EOS)."""
    valid: Optional[torch.Tensor] = None
    """Generation: [B, T] bool, the positions an item generated (its answer may end early at EOS)."""
    exact_logits: Optional[torch.Tensor] = None

    def run_from(self, m: StagedModel, state: BoundaryState, start: int) -> torch.Tensor:
        """The scored part of the end output of stages ``start ..`` on ``state``: for generation, the logits at
        :attr:`positions` only (the LM head, position-wise, runs on those positions alone: most of a small
        model's head cost is the vocabulary projection of prompt positions nobody scores)."""
        last = m.num_stages - 1
        if self.positions is None:
            return m.output(m.run(state, range(start, m.num_stages)))
        if start <= last and m.stages[last].kind == "head":
            state = m.run(state, range(start, last))
            if "hidden_states" in state:
                return m.output(m.run_stage(last, {**state, "hidden_states": self._gather(state["hidden_states"])}))
            start = last
        return self._gather(m.output(m.run(state, range(start, m.num_stages))))

    def exit_agreement(self, m: StagedModel, state: BoundaryState) -> Optional[float]:
        """Generation: the share of the exact greedy tokens (scored positions) that the head stage applied to
        ``state`` (an inner stage's output: an early exit) predicts, teacher-forced; None but for LMs."""
        last = m.num_stages - 1
        if m.task != "generate" or m.stages[last].kind != "head" or "hidden_states" not in state:
            return None
        out = self.run_from(m, state, last)
        v = self.valid.float()
        return float(((out.argmax(-1) == self.target).float() * v).sum() / v.sum())

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        idx = self.positions.to(t.device).unsqueeze(-1).expand(-1, -1, t.shape[-1])
        return t.gather(1, idx)

    def score(self, output: torch.Tensor) -> Fidelity:
        """Scores a coded run's end output (as :meth:`run_from` returns it)."""
        out = output.float()
        if self.metric == "token_agreement":
            v = self.valid.float()
            per_item = ((out.argmax(-1) == self.target).float() * v).sum(1) / v.sum(1)
            logp = torch.log_softmax(out, dim=-1)
            kl = (self.exact.exp() * (self.exact - logp)).sum(-1).clamp(min=0)
            cos = torch.nn.functional.cosine_similarity(out, self.exact_logits, dim=-1, eps=1e-12)
            err = (out - self.exact_logits).abs().amax(-1)
            return Fidelity(
                mean=float(per_item.mean()),
                min=float(per_item.min()),
                kl_mean=float((kl * v).sum() / v.sum()),
                cosine=float(((cos * v).sum() / v.sum()).clamp(-1, 1)),
                max_abs_error=float((err * v).max()),
            )
        if self.metric == "label_agreement":
            per_item = (out.argmax(-1) == self.exact.argmax(-1)).float()
        else:
            target = self.target if self.target is not None else self.exact
            per_item = torch.nn.functional.cosine_similarity(
                out.reshape(out.shape[0], -1).double(), target.reshape(target.shape[0], -1).double(), dim=-1, eps=1e-12
            ).clamp(-1, 1)
        cos = torch.nn.functional.cosine_similarity(
            out.reshape(out.shape[0], -1), self.exact.reshape(out.shape[0], -1).float(), dim=-1, eps=1e-12
        )
        return Fidelity(
            mean=min(1.0, float(per_item.mean())),
            min=min(1.0, float(per_item.min())),
            cosine=float(cos.mean().clamp(-1, 1)),
            max_abs_error=float((out - self.exact.float()).abs().max()),
        )

    def finish(self, exact_output: torch.Tensor) -> None:
        """Records the exact model's end output on :attr:`inputs` (as :meth:`run_from` returns it) and scores it."""
        out = exact_output.float()
        if self.metric == "token_agreement":
            self.exact_logits = out
            self.exact = torch.log_softmax(out, dim=-1)
            self.target = out.argmax(-1)
            # teacher-forced exact argmax against the batch-1 greedy tokens: 1 unless batching moved a near tie
            v = self.valid.float()
            self.reference_min = float((((self.target == self.greedy).float() * v).sum(1) / v.sum(1)).min())
        elif self.exact is None:
            self.exact = out
        self.exact_fidelity = self.score(out)
        if self.metric == "embedding_cosine":
            self.reference_min = self.exact_fidelity.min


def _sentence_transformers_reference(m: StagedModel, texts: list[str]) -> Optional[torch.Tensor]:
    """``encode()`` of a sentence-transformers model directory (its own pooling, normalisation, truncation), or
    None when the model is not one or sentence-transformers is not installed."""
    from aiflow_cli.models import resolve

    try:
        directory = resolve(m.name).directory
    except Exception:  # noqa: BLE001 - a model without a directory has no reference implementation
        return None
    if not (directory / "modules.json").is_file():
        return None
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    st = SentenceTransformer(str(directory), device=str(m.device))
    return st.encode(texts, convert_to_tensor=True, batch_size=len(texts)).to(m.device).float()


def build_reference(
    m: StagedModel, *, items: Optional[int] = None, tokens: int = DEFAULT_TOKENS, progress=None
) -> Reference:
    """The calibration batch of ``m`` and what its coded runs are scored against (exact output still to be
    recorded with :meth:`Reference.finish` after the exact pass, which the profiler shares with its cuts)."""
    metric = metric_for(m)
    if metric == "output_cosine":
        n = items or RANDOM_ITEMS
        return Reference(metric, m.make_inputs(batch=n, seed=0), n, reference="the exact model on random inputs")
    prepared = calibration_items(m, items)
    if metric == "token_agreement":
        if tokens < 1:
            raise InputError(f"calibration_tokens={tokens}: must be >= 1", param="calibration_tokens")
        if progress:
            progress("reference generations", 0, 1)
        conts = greedy_references(m, prepared, tokens)
        if progress:
            progress("reference generations", 1, 1)
        forced = [_teacher_forced(it, cont, m.device) for it, cont in zip(prepared, conts)]
        batch, _ = pad_batch(forced)
        width = max(len(c) for c in conts)
        positions = torch.zeros(len(conts), width, dtype=torch.long)
        valid = torch.zeros(len(conts), width, dtype=torch.bool)
        greedy = torch.full((len(conts), width), -1, dtype=torch.long)
        for i, (it, cont) in enumerate(zip(prepared, conts)):
            start = it["input_ids"].shape[1] - 1  # the logits at the prompt's last token predict the first one
            n = len(cont)
            # an answer that ended early (EOS) is scored on its own positions; padding repeats its last one
            positions[i] = torch.arange(start, start + width).clamp(max=start + n - 1)
            valid[i, :n] = True
            greedy[i, :n] = torch.tensor(cont)
        return Reference(
            metric,
            batch,
            len(prepared),
            tokens=tokens,
            positions=positions,
            reference="the exact model's greedy continuation (teacher-forced)",
            greedy=greedy.to(m.device),
            valid=valid.to(m.device),
        )
    batch, _ = pad_batch(prepared)
    ref = Reference(metric, batch, len(prepared))
    if metric == "embedding_cosine":
        st = _sentence_transformers_reference(m, list(raw_items(m, items)))
        if st is not None:
            ref.target, ref.reference = st, "sentence-transformers encode()"
        else:
            ref.reference = "the exact model"
    return ref


def _teacher_forced(item: BoundaryState, continuation: list[int], device: torch.device) -> BoundaryState:
    """The prompt followed by all but the last generated token, as one batch-1 input."""
    extra = torch.tensor([continuation[:-1]], dtype=item["input_ids"].dtype, device=device)
    n = extra.shape[1]
    out = dict(item)
    out["input_ids"] = torch.cat([item["input_ids"], extra], dim=1)
    out["attention_mask"] = torch.cat([item["attention_mask"], torch.ones_like(extra)], dim=1)
    last = item["position_ids"][:, -1:]
    out["position_ids"] = torch.cat([item["position_ids"], last + torch.arange(1, n + 1, device=device)], dim=1)
    if "token_type_ids" in item:
        out["token_type_ids"] = torch.cat([item["token_type_ids"], torch.zeros_like(extra)], dim=1)
    return out
