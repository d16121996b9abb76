"""The calibration set: real inputs that ship with aiflow (``aiflow_cli/assets/calibration/``).

Fidelity is measured on them, in the task's own metric, by the profiler (per cut and codec) and by the plan
verifier (the chosen combination, end to end). :func:`calibration_items` turns the set into stage-0 inputs for one
model, one item per request (batch 1), prepared exactly as the runtime prepares a request.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from aiflow_cli.errors import InputError
from aiflow_cli.task import takes_image

if TYPE_CHECKING:  # (the models import torch; the planner reads DEFAULT_TOKENS and the set's hash without it)
    from aiflow_cli.models import BoundaryState, StagedModel

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CALIBRATION_DIR = ASSETS / "calibration"
#: Images in the order they are used: the bundled sample first (the demo's and the bench's default input).
IMAGE_FILES = (
    "../sample.jpg",
    "sample-closeup.jpg",
    "sample-mirror-dark.jpg",
    "drawn-landscape.png",
    "drawn-pattern.jpg",
)

#: The metric of each task (docs/planner.md, "Fidelity").
TASK_METRICS = {
    "generate": "token_agreement",
    "caption": "token_agreement",
    "encode": "embedding_cosine",
    "classify": "label_agreement",
}
#: Generated tokens per item that fidelity is measured on by default (generation and captioning).
DEFAULT_TOKENS = 32


@dataclass(frozen=True)
class CalibrationSet:
    prompts: tuple[str, ...]
    sentences: tuple[str, ...]
    images: tuple[Path, ...]
    hash: str
    """sha256 (16 hex) of every file of the set: profiles and verified plans record it."""


@lru_cache(maxsize=1)
def load_calibration() -> CalibrationSet:
    """Reads the shipped calibration set."""
    files = [CALIBRATION_DIR / "prompts.json", CALIBRATION_DIR / "sentences.json"]
    images = tuple((CALIBRATION_DIR / f).resolve() for f in IMAGE_FILES)
    h = hashlib.sha256()
    for f in files + list(images):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    prompts = tuple(json.loads(files[0].read_text(encoding="utf-8")))
    sentences = tuple(json.loads(files[1].read_text(encoding="utf-8")))
    return CalibrationSet(prompts, sentences, images, h.hexdigest()[:16])


def metric_for(model: StagedModel) -> str:
    """The fidelity metric of a model: its task's, or ``output_cosine`` when it cannot take calibration inputs."""
    return TASK_METRICS.get(model.task, "output_cosine") if takes_calibration(model) else "output_cosine"


def takes_calibration(model: StagedModel) -> bool:
    """Whether the model prepares real text or images (fx models and unknown tasks take raw tensors only)."""
    return model.family != "fx" and model.task in TASK_METRICS


def load_image(path: Path):
    """An image as the runtime sees it: the file's bytes, decoded to RGB by the tier that preprocesses it."""
    from aiflow_cli.models.inputs import decode_image_file, image_file_tensor

    return decode_image_file(image_file_tensor(path))


def raw_items(model: StagedModel, limit: Optional[int] = None) -> list:
    """The calibration inputs of the model's task (texts or PIL images), at most ``limit`` of them."""
    cal = load_calibration()
    if model.task == "generate":
        items: list = list(cal.prompts)
    elif model.task == "encode":
        items = list(cal.sentences)
    elif takes_image(model.task):
        items = [load_image(p) for p in cal.images]
    else:
        raise InputError(f"{model.name} ({model.task}) has no calibration inputs")
    if limit is not None:
        if limit < 1:
            raise InputError(f"calibration_items={limit}: must be >= 1", param="calibration_items")
        items = items[:limit]
    return items


def calibration_items(model: StagedModel, limit: Optional[int] = None) -> list[BoundaryState]:
    """One stage-0 input per calibration item (batch 1), through :meth:`StagedModel.prepare`."""
    key = "image" if takes_image(model.task) else "text"
    return [model.prepare(**{key: x}) for x in raw_items(model, limit)]
