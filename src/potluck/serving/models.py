"""The models a server holds: each folder loaded once as a `ServedModel` named after the folder.

    models = load_models(["models/urgency", "models/intent"], precision="auto")   # name -> ServedModel
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from potluck.errors import UserError
from potluck.folder import read_meta
from potluck.inference import Predictor
from potluck.serving.batcher import MicroBatcher
from potluck.serving.schemas import ModelInfo

logger = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class ServedModel:
    """One loaded model folder: its predictor, its potluck.json and (while running) its batcher."""

    name: str
    predictor: Predictor
    meta: dict
    batcher: MicroBatcher | None = None

    def info(self) -> ModelInfo:
        p = self.predictor
        return ModelInfo(name=self.name, route=f"/v1/models/{self.name}/predict", labels=p.labels,
                         base=self.meta.get("base"), max_length=p.max_length, precision=p.precision_used,
                         backend=p.backend,
                         created=self.meta.get("created"), metrics=self.meta.get("metrics") or {},
                         calibration=self.meta.get("calibration") or {})


def load_models(folders: Sequence[str | os.PathLike], precision: str = "auto",
                backend: str = "torch") -> dict[str, ServedModel]:
    """Load each folder as a model named after the folder; names must be unique and URL-safe."""
    models: dict[str, ServedModel] = {}
    for folder in folders:
        folder = Path(folder)
        name = folder.resolve().name
        if not NAME.match(name):
            raise UserError(f"model folder name '{name}' cannot be a route name",
                            hint="rename it to letters, digits, '.', '_' or '-'")
        if name in models:
            raise UserError(f"two model folders are both named '{name}'", hint="rename one of them")
        if not folder.is_dir():
            raise UserError(f"no such model folder: {folder}", hint="pass the --out folder of `potluck finetune`")
        meta = read_meta(folder)
        models[name] = ServedModel(name, Predictor.from_folder(folder, precision=precision, backend=backend), meta)
        logger.info("loaded %s from %s (%s)", name, folder, models[name].predictor.precision_used)
    if not models:
        raise UserError("no model folders given", hint="e.g. potluck serve models/urgency")
    return models
