"""Every task of the commons, served: `POST /v1/tasks/{task}/predict`, the shape of `potluck serve`.

    curl -H "Authorization: Bearer $TOKEN" URL/v1/tasks/acme-urgency/predict -d '{"inputs": "site down"}'
    [{"label": "urgent", "score": 0.93}, {"label": "calm", "score": 0.07}]

Which model answers for a task (the `X-Potluck-Head` and `X-Potluck-Base-Version` headers say):
1. `refit`: the newest head the commons fitted on the current base after a round promoted it, on the
   current base's encoder (so every task with shared data runs on one encoder);
2. `contribution`: else the newest pushed contribution for the task, preferring one on the current base,
   as its contributor trained it: its own encoder body and its head.
A task with neither is a 404 saying so. Loaded models are kept in a small LRU cache.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from potluck.commons.errors import CommonsError, NotFound, TooLarge
from potluck.commons.formats import HEAD_PREFIX

logger = logging.getLogger(__name__)

MAX_INPUTS = 256


class Unprocessable(CommonsError):
    status = 422


class TaskServer:
    """Chooses each task's head, loads it once (LRU of `cache_size` models) and predicts."""

    def __init__(self, commons, cache_size: int = 8, precision: str = "auto"):
        self.commons = commons
        self.cache_size = cache_size
        self.precision = precision
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()

    def choose(self, task: str) -> dict:
        """The head that serves `task` now (see the module docstring)."""
        self.commons.registry.task(task)  # 404 for an unknown task
        current = self.commons.registry.current_base().version
        heads = self.commons.registry.task_heads(task)  # newest first
        refit = [h for h in heads if h["contribution"] is None and h["base_version"] == current]
        pushed = sorted((h for h in heads if h["contribution"] is not None),
                        key=lambda h: (h["base_version"] == current, h["id"]), reverse=True)
        if refit:
            return {**refit[0], "kind": "refit"}
        if pushed:
            return {**pushed[0], "kind": "contribution"}
        raise NotFound(f"task {task!r} has no head yet: push weights for it, or share data and run a round")

    def predictor(self, head: dict):
        key = (head["id"], head["kind"])
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        predictor = self._load(head)
        with self._lock:
            self._cache[key] = predictor
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return predictor

    def _load(self, head: dict):
        from safetensors.torch import load_file

        from potluck.commons.rounds import base_folder
        from potluck.encoders import load_for_classification, load_tokenizer
        from potluck.inference import Predictor

        store = self.commons.store
        folder = base_folder(self.commons, head["base_version"])
        model = load_for_classification(folder, list(head["labels"]))  # (body of the base, a new head)
        if head["kind"] == "contribution":
            record = self.commons.registry.contribution(head["contribution"])
            body = {k: v for k, v in load_file(store.verify(record.blob_sha)).items() if not k.startswith(HEAD_PREFIX)}
            missing, unexpected = model.base_model.load_state_dict(body, strict=False)
            if unexpected or [m for m in missing if not m.endswith("position_ids")]:
                raise CommonsError(f"contribution {record.id} does not fit its base (missing {missing[:2]}, "
                                   f"unexpected {unexpected[:2]})")
        head_tensors = load_file(store.verify(head["blob_sha"]))
        missing, unexpected = model.load_state_dict(head_tensors, strict=False)
        if unexpected or not set(head_tensors) <= set(model.state_dict()):
            raise CommonsError(f"head {head['id']} of task {head['task_name']!r} does not fit the model "
                               f"(unexpected tensors {unexpected[:3]})")
        logger.info("loaded task %s: %s head %d on base %d", head["task_name"], head["kind"], head["id"],
                    head["base_version"])
        return Predictor(model, load_tokenizer(folder), precision=self.precision)

    def predict(self, task: str, texts: list[str], *, raw_scores: bool = False,
                truncate: bool = True) -> tuple[list[list[dict]], dict]:
        """Per text, every label with its probability (or logit), highest first; and the head used."""
        from potluck.calibration import softmax
        from potluck.errors import UserError
        from potluck.inference import ranked

        if len(texts) > MAX_INPUTS:
            raise TooLarge(f"{len(texts)} texts in one request; send at most {MAX_INPUTS}")
        head = self.choose(task)
        predictor = self.predictor(head)
        try:
            logits = predictor.logits_from_ids(predictor.encode(texts, truncate=truncate))  # (N, C)
        except UserError as err:
            raise Unprocessable(str(err)) from None
        scores = logits if raw_scores else softmax(logits)
        return ranked(scores, predictor.labels, digits=None), head
