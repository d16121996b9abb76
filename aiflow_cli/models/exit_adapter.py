"""Trained early exits: a small adapter between block ``k``'s output and the model's own final norm + LM head.

Self-speculation drafts with the device's blocks ``[0:k]`` and the model's head (an *early exit*). Untrained, that
exit rarely agrees with the full model unless ``k`` is near the top. An :class:`ExitAdapter` is a position-wise
low-rank residual MLP (``h + up(gelu(down(rms(h))))``), fitted by self-distillation: KL from the full model's
next-token distribution to the exit's, on the shipped calibration prompts and the full model's own greedy
continuations of them. Position-wise on purpose: it keeps no KV cache, so a rejected draft needs no roll-back
beyond the blocks' own, and it costs the device ``2 * hidden * rank`` multiply-adds per drafted token (the head
costs ``hidden * vocab``). ``up`` starts at zero, so step 0 is the untrained exit.

    r = train_exit("smollm2", exit_layer=26, steps=300, seed=0)    # -> TrainResult (path, losses, acceptance)
    a = find_exit(model_hash, 26)                                 # -> ExitAdapter or None

Files: ``$AIFLOW_CACHE_DIR/exits/<model hash>/exit-layer<k>.safetensors`` (beside the model cache), with one
metadata key whose JSON records the model hash, ``k``, rank, steps, seed and losses, so the same seed and steps
give the same bytes on one machine (the training runs on one torch thread).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from aiflow_cli.errors import InputError, ModelError

#: The one metadata key of an adapter file (safetensors writes a map in random order: one key keeps bytes fixed).
META_KEY = "aiflow_exit_adapter"
FORMAT_VERSION = 1
DEFAULT_RANK = 128
DEFAULT_STEPS = 300
#: Calibration prompts kept out of training: acceptance before/after is measured on them.
HELD_OUT = 4
#: Greedy tokens generated per prompt (the drafts a device would propose are continuations).
CONTINUATION_TOKENS = 32
BATCH_POSITIONS = 256
LEARNING_RATE = 2e-3
#: The KL is taken over the union of the teacher's top tokens per position (the full vocabulary's head is the
#: cost of a step: 49k rows for SmolLM2); the exit's greedy token is nearly always in it.
TEACHER_TOP = 32

Progress = Callable[[str], None]


def exits_dir() -> Path:
    """``$AIFLOW_CACHE_DIR/exits`` (default ``~/.cache/aiflow/exits``), beside the model cache."""
    return Path(os.environ.get("AIFLOW_CACHE_DIR", Path.home() / ".cache" / "aiflow")) / "exits"


def exit_path(model_hash: str, exit_layer: int) -> Path:
    return exits_dir() / model_hash / f"exit-layer{exit_layer}.safetensors"


class ExitAdapter(nn.Module):
    """``h + up(gelu(down(h / rms(h))))`` on every position of block ``exit_layer``'s output (see the module)."""

    def __init__(self, hidden: int, rank: int, exit_layer: int, model_hash: str = ""):
        super().__init__()
        self.exit_layer = exit_layer
        self.model_hash = model_hash
        self.meta: dict[str, Any] = {}
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, hidden, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return h + self.up(nn.functional.gelu(self.down(x))).to(h.dtype)

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def save(self, path: Path) -> None:
        """Writes the adapter reproducibly (same tensors and metadata, same bytes), atomically."""
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(self.meta, format=FORMAT_VERSION, model_hash=self.model_hash, exit_layer=self.exit_layer)
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, model_hash: Optional[str] = None) -> "ExitAdapter":
        """Reads an adapter file; :class:`ModelError` (one line) for a file of another model or an unreadable one."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})[META_KEY])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            down, up = tensors["down.weight"], tensors["up.weight"]
            if down.dim() != 2 or tuple(up.shape) != tuple(down.shape)[::-1]:
                raise ValueError(f"weights of shapes {tuple(down.shape)} and {tuple(up.shape)}, not [r, h] and [h, r]")
            exit_layer = int(meta["exit_layer"])
        except Exception as e:  # noqa: BLE001 - any damage reads as one line
            why = str(e).splitlines()[0][:200] if str(e) else ""
            raise ModelError(f"{path}: not an aiflow exit adapter ({type(e).__name__}: {why})") from None
        if model_hash is not None and meta.get("model_hash") != model_hash:
            raise ModelError(f"{path}: trained for model {str(meta.get('model_hash'))[:12]}, not {model_hash[:12]}")
        a = cls(down.shape[1], down.shape[0], exit_layer, str(meta.get("model_hash", "")))
        a.load_state_dict({"down.weight": down, "up.weight": up})
        a.meta = meta
        return a.eval().requires_grad_(False)


def find_exit(model_hash: str, exit_layer: Optional[int]) -> Optional[ExitAdapter]:
    """The trained exit of ``model_hash`` after block ``exit_layer``, or None when none was trained."""
    if exit_layer is None:
        return None
    path = exit_path(model_hash, exit_layer)
    return ExitAdapter.load(path, model_hash) if path.is_file() else None


def exit_layers(model) -> list[int]:
    """Block layer -> nothing; the list of layers an exit can follow: every block but the last (the last block's
    output through the head is the model itself)."""
    layers = [s.layer for s in model.stages if s.kind == "block" and s.layer is not None]
    return layers[:-1]


def stage_of_layer(model, layer: int) -> int:
    """The stage index of block ``layer``."""
    return next(i for i, s in enumerate(model.stages) if s.kind == "block" and s.layer == layer)


def check_exit_model(model, exit_layer: int) -> None:
    """One-line errors for a model an exit cannot be trained on, or a layer out of range."""
    from aiflow_cli.runtime.speculate import unsupported

    if model.task != "generate" or model.stages[-1].kind != "head":
        raise ModelError(f"{model.name} ({model.task}) is not a language model with a head: it has no exit to train")
    why = unsupported(model)
    if why:
        raise ModelError(f"{model.name}: {why}")
    layers = exit_layers(model)
    if not layers:
        raise ModelError(f"{model.name} has one block: there is no early exit")
    if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or exit_layer not in layers:
        raise InputError(
            f"exit_layer={exit_layer}: {model.name} has blocks 0..{layers[-1] + 1}; an exit follows one of blocks "
            f"0..{layers[-1]} (after the last one the head is the model itself)",
            param="exit_layer",
        )


# -- data: prompts, the full model's greedy continuations and distributions ---------------------------------------
@dataclass
class _Seq:
    hidden: torch.Tensor  # [S, H] block k's output, every position
    logp: torch.Tensor  # [S, V] the full model's next-token log-probabilities
    greedy: torch.Tensor  # [S] the full model's greedy next token
    scored: torch.Tensor  # [S] bool: positions whose next token is a generated one (what a draft proposes)


@torch.inference_mode()
def _sequence(model, prompt: str, exit_stage: Optional[int], tokens: int) -> _Seq:
    x = model.prepare(text=prompt)
    cfg = model.adapter.config
    room = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1 << 30
    ids = x["input_ids"][:, -max(1, room - tokens - 1) :]  # a long text keeps its end (the positions fit)
    if ids.shape[1] < x["input_ids"].shape[1]:
        x = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(ids.shape[1])[None]}
    gen = model.generate(x, tokens)
    ids = torch.cat([x["input_ids"], gen], dim=1)[:, :-1]  # the last token's successor is not needed
    s = ids.shape[1]
    state: dict[str, torch.Tensor] = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.arange(s).unsqueeze(0),
    }
    hidden = None
    for i in range(model.num_stages):
        state = model.run_stage(i, state)
        if i == exit_stage:
            hidden = state["hidden_states"][0].float()
    logits = model.output(state)[0].float()
    p = x["input_ids"].shape[1]
    scored = torch.zeros(s, dtype=torch.bool)
    scored[p - 1 :] = True
    if hidden is None:  # no exit asked for (the draft vocabulary only)
        hidden = torch.empty(s, 0)
    return _Seq(hidden, torch.log_softmax(logits, -1), logits.argmax(-1), scored)


def _head_parts(model) -> tuple[nn.Module, torch.Tensor, Optional[torch.Tensor]]:
    """The final norm module and the LM head's weight / bias (the head stage's modules: norm, then lm_head)."""
    mods = [model.adapter.model.get_submodule(n) for n in model.stages[-1].modules]
    norm, head = mods[0], mods[-1]
    return norm, head.weight.detach().float(), (head.bias.detach().float() if head.bias is not None else None)


def _agreement(model, adapter: Optional[ExitAdapter], seqs: list[_Seq]) -> float:
    """Teacher-forced share of generated positions where the exit's greedy token is the full model's."""
    head = model.num_stages - 1
    hits = total = 0
    with torch.inference_mode():
        for q in seqs:
            h = q.hidden[q.scored].unsqueeze(0).to(model.dtype)
            if adapter is not None:
                h = adapter(h)
            guess = model.output(model.run_stage(head, {"hidden_states": h}))[0].argmax(-1)
            hits += int((guess == q.greedy[q.scored]).sum())
            total += int(q.scored.sum())
    return hits / max(total, 1)


@dataclass
class TrainResult:
    path: str
    model: str
    model_hash: str
    exit_layer: int
    exit_stage: int
    rank: int
    steps: int
    seed: int
    train_positions: int
    held_out_prompts: int
    loss_before: float
    loss_after: float
    acceptance_before: float
    acceptance_after: float
    train_s: float
    param_bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def train_exit(
    name: str,
    exit_layer: int,
    *,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    rank: int = DEFAULT_RANK,
    tokens: int = CONTINUATION_TOKENS,
    max_texts: Optional[int] = None,
    progress: Progress = lambda s: None,
) -> TrainResult:
    """Fits the exit adapter of model ``name`` after block ``exit_layer`` (see the module docstring), saves it
    at :func:`exit_path` and returns what it measured. CPU, one torch thread, seeded. ``tokens``: greedy tokens
    generated per text; ``max_texts``: train on the first texts only (tests)."""
    import hashlib

    from aiflow_cli.models import load_model
    from aiflow_cli.profile.calibration import load_calibration

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InputError(f"steps={steps}: must be an integer >= 0", param="steps")
    if rank < 1:
        raise InputError(f"rank={rank}: must be >= 1", param="rank")
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float reductions on every run: reproducible bytes
    try:
        model = load_model(name)
        check_exit_model(model, exit_layer)
        exit_stage = stage_of_layer(model, exit_layer)
        cal = load_calibration()
        prompts = list(cal.prompts) + list(cal.sentences)
        held, train = list(cal.prompts[-HELD_OUT:]), [p for p in prompts if p not in cal.prompts[-HELD_OUT:]]
        train = train[:max_texts] if max_texts is not None else train
        seqs: list[_Seq] = []
        tests: list[_Seq] = []
        for i, p in enumerate(train + held):
            progress(f"full model's greedy continuation {i + 1}/{len(train) + len(held)}")
            (seqs if i < len(train) else tests).append(_sequence(model, p, exit_stage, tokens))
        _vocab_of(model, name, seqs, tests, tokens, cal.hash).save(vocab_path(model.model_hash))  # free here
        hidden = torch.cat([q.hidden for q in seqs])
        logp = torch.cat([q.logp for q in seqs])
        vocab = torch.unique(logp.topk(min(TEACHER_TOP, logp.shape[1]), -1).indices)  # sorted
        target = torch.softmax(logp[:, vocab], -1)  # the teacher on the candidate tokens, renormalised
        del logp
        norm, w, b = _head_parts(model)
        w = w[vocab]
        b = b[vocab] if b is not None else None
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        adapter = ExitAdapter(hidden.shape[1], min(rank, hidden.shape[1]), exit_layer, model.model_hash)
        with torch.no_grad():  # seeded init (nn.Linear's default draws from the global generator)
            adapter.down.weight.normal_(0, 1 / math.sqrt(hidden.shape[1]), generator=g)
        norm = norm.float().requires_grad_(False)

        def loss_of(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            logits = nn.functional.linear(norm(adapter(h)), w, b)
            return nn.functional.kl_div(torch.log_softmax(logits, -1), t, reduction="batchmean")

        with torch.no_grad():
            loss_before = float(loss_of(hidden, target))
        opt = torch.optim.Adam(adapter.parameters(), lr=LEARNING_RATE)
        n = hidden.shape[0]
        for step in range(steps):
            idx = torch.randint(0, n, (min(BATCH_POSITIONS, n),), generator=g)
            loss = loss_of(hidden[idx], target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 50 == 0:
                progress(f"step {step}/{steps}: KL {loss.item():.3f}")
        adapter.eval().requires_grad_(False)
        with torch.no_grad():
            loss_after = float(loss_of(hidden, target))
        progress("acceptance on the held-out prompts")
        before = _agreement(model, None, tests)
        after = _agreement(model, adapter, tests)
        adapter.meta = {
            "model": name,
            "rank": adapter.down.weight.shape[0],
            "steps": steps,
            "seed": seed,
            "tokens": tokens,
            "loss_before": round(loss_before, 6),
            "loss_after": round(loss_after, 6),
            "acceptance_before": round(before, 6),
            "acceptance_after": round(after, 6),
            "calibration": cal.hash,
        }
        path = exit_path(model.model_hash, exit_layer)
        adapter.save(path)
    finally:
        torch.set_num_threads(threads)
    return TrainResult(
        path=str(path),
        model=name,
        model_hash=model.model_hash,
        exit_layer=exit_layer,
        exit_stage=exit_stage,
        rank=adapter.down.weight.shape[0],
        steps=steps,
        seed=seed,
        train_positions=n,
        held_out_prompts=len(held),
        loss_before=round(loss_before, 6),
        loss_after=round(loss_after, 6),
        acceptance_before=round(before, 4),
        acceptance_after=round(after, 4),
        train_s=round(time.perf_counter() - t0, 2),
        param_bytes=adapter.param_bytes,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
    )


# -- the draft vocabulary: the tokens a truncated exit head drafts from -------------------------------------------
#: Held-out coverage is reported for these subset sizes.
VOCAB_SIZES = (1024, 2048, 4096, 8192, 16384)
VOCAB_FILE = "draft-vocab.safetensors"


def vocab_path(model_hash: str) -> Path:
    """``$AIFLOW_CACHE_DIR/exits/<model hash>/draft-vocab.safetensors``: beside the trained exits."""
    return exits_dir() / model_hash / VOCAB_FILE


@dataclass
class DraftVocab:
    """Every token id of a model ranked for drafting (FR-Spec, Zhao et al. 2025): the end-of-sequence ids first,
    then by how often the full model's greedy next token was that token on the calibration texts and its own
    greedy continuations of them (held-out prompts excluded), ties and tokens never seen by id (for byte-level
    BPE tokenizers the id order is the merge order, itself a frequency order of the tokenizer's corpus).
    :meth:`subset` is the N most frequent: a drafter's head then computes N logits instead of the vocabulary's.
    Greedy drafting from it stays exact (the target verifies every draft), and so does sampling (the draft
    distribution is zero outside the subset; the rejection rule holds for any draft distribution)."""

    ranking: torch.Tensor  # [V] int64, a permutation of 0..V-1
    meta: dict[str, Any]

    def subset(self, n: int) -> torch.Tensor:
        """The ``n`` first-ranked token ids, sorted (int64); one-line error for ``n`` out of 1..V."""
        v = int(self.ranking.numel())
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= v:
            raise InputError(f"draft vocabulary size {n!r}: give a whole number in 1..{v}", param="draft_vocab")
        return torch.sort(self.ranking[:n]).values

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        meta = json.dumps(dict(self.meta, format=FORMAT_VERSION), sort_keys=True)
        save_file({"ranking": self.ranking.to(torch.int32).contiguous()}, str(tmp), metadata={META_KEY: meta})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, model_hash: Optional[str] = None) -> "DraftVocab":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})[META_KEY])
                ranking = f.get_tensor("ranking").to(torch.int64)
            v = ranking.numel()
            if ranking.dim() != 1 or not torch.equal(torch.sort(ranking).values, torch.arange(v)):
                raise ValueError("the ranking is not a permutation of the vocabulary")
        except Exception as e:  # noqa: BLE001 - any damage reads as one line
            why = str(e).splitlines()[0][:200] if str(e) else ""
            raise ModelError(f"{path}: not an aiflow draft vocabulary ({type(e).__name__}: {why})") from None
        if model_hash is not None and meta.get("model_hash") != model_hash:
            raise ModelError(f"{path}: counted for model {str(meta.get('model_hash'))[:12]}, not {model_hash[:12]}")
        return cls(ranking, meta)


def find_vocab(model_hash: str) -> Optional[DraftVocab]:
    """The cached draft vocabulary of ``model_hash``, or None when none was counted."""
    path = vocab_path(model_hash)
    return DraftVocab.load(path, model_hash) if path.is_file() else None


def rank_vocab(vocab_size: int, counts: torch.Tensor, first: Any = ()) -> torch.Tensor:
    """Token ids ranked: ``first`` (in order), then by ``counts`` ([V]) descending, ties by id."""
    ranked = torch.sort(-counts.to(torch.long)[:vocab_size], stable=True).indices  # ties keep id order
    head = [int(i) for i in first if 0 <= int(i) < vocab_size]
    if head:
        rest = ranked[~torch.isin(ranked, torch.tensor(head))]
        ranked = torch.cat([torch.tensor(head, dtype=torch.long), rest])
    return ranked


def _vocab_of(model, name: str, train: list[_Seq], held: list[_Seq], tokens: int, calibration: str) -> DraftVocab:
    """Counts the full model's greedy next tokens over ``train`` (every position) into a :class:`DraftVocab`;
    measures on ``held`` the share of generated greedy tokens inside each subset size (its coverage: the most
    a truncated drafter can be accepted)."""
    v = int(train[0].logp.shape[1]) if train else int(model.adapter.config.vocab_size)
    counts = torch.zeros(v, dtype=torch.long)
    for q in train:
        counts += torch.bincount(q.greedy, minlength=v)[:v]
    ranking = rank_vocab(v, counts, sorted(model.eos_token_ids))
    want = torch.cat([q.greedy[q.scored] for q in held]) if held else torch.empty(0, dtype=torch.long)
    rank_of = torch.empty(v, dtype=torch.long)
    rank_of[ranking] = torch.arange(v)
    coverage = {
        str(n): round(float((rank_of[want] < n).float().mean()), 4) if want.numel() else None
        for n in ([n for n in VOCAB_SIZES if n < v] or [v // 8, v // 4, v // 2])
    }
    meta = {
        "model": name,
        "model_hash": model.model_hash,
        "vocab_size": v,
        "counted_positions": int(sum(q.greedy.numel() for q in train)),
        "distinct_tokens": int((counts > 0).sum()),
        "tokens": tokens,
        "held_out_positions": int(want.numel()),
        "held_out_coverage": coverage,
        "calibration": calibration,
        "source": "the full model's greedy next token at every position of the calibration texts and of its own "
        "greedy continuations (held-out prompts excluded); unseen tokens by id",
    }
    return DraftVocab(ranking, meta)


def build_vocab(
    name: str,
    *,
    tokens: int = CONTINUATION_TOKENS,
    max_texts: Optional[int] = None,
    progress: Progress = lambda s: None,
) -> tuple[DraftVocab, Path, float]:
    """Counts and saves the draft vocabulary of model ``name`` (see :class:`DraftVocab`); returns it, its path
    and the seconds it took. :func:`train_exit` saves the same from the sequences it generates anyway."""
    from aiflow_cli.models import load_model
    from aiflow_cli.profile.calibration import load_calibration

    t0 = time.perf_counter()
    model = load_model(name)
    if model.task != "generate" or model.stages[-1].kind != "head":
        raise ModelError(f"{model.name} ({model.task}) is not a language model with a head: it has no vocabulary")
    cal = load_calibration()
    held_p = list(cal.prompts[-HELD_OUT:])
    train_p = [p for p in list(cal.prompts) + list(cal.sentences) if p not in held_p][:max_texts]
    seqs = []
    for i, p in enumerate(train_p + held_p):
        progress(f"draft vocabulary: the full model's greedy continuation {i + 1}/{len(train_p) + len(held_p)}")
        seqs.append(_sequence(model, p, None, tokens))
    vocab = _vocab_of(model, name, seqs[: len(train_p)], seqs[len(train_p) :], tokens, cal.hash)
    path = vocab_path(model.model_hash)
    vocab.save(path)
    return vocab, path, round(time.perf_counter() - t0, 2)
