"""Fusion rounds: the accepted weights on the current base, fused into a candidate base, judged by the gate.

    potluck commons round URL --method median --min-contributions 3      # admin; POST /v1/rounds

    from potluck.commons.rounds import run_round
    outcome = run_round(commons, admin, RoundSettings(method="median"))  # {"outcome": "promoted", ...}

One round, synchronously (the frozen-encoder gate takes seconds on tiny encoders, a few minutes on MiniLM):

1. the accepted weights contributions on the current base that no promoted round used (`available`);
   fewer than `min_contributions`, or no task with evaluation data, and the round does nothing and says
   why (`outcome: "skipped"`);
2. their encoder bodies are fused by `potluck.fusion.fuse` (heads never: a contribution's `head.*` tensors
   are left out) into a candidate, stored as a base version with status `candidate`, parent = current,
   lineage = the contributions, method, parameters and each one's task-vector norm; the contributions are
   claimed (`fused_into` the candidate) so that no other round takes them. Only a promotion uses them up:
   a rejected candidate (by the gate, or one it could not score, or a round that stopped) gives them back
   (`release`) for the next round, where a robust method can outvote a poisoner among them; the rejected
   candidate's lineage keeps who was in it;
3. `potluck.commons.gate.run_gate` scores current and candidate on every task with evaluation data: the held-back
   parts of shared datasets, and `--eval-only` datasets (an eval-only task's head is trained on one half
   of it and scored on the other); promoted iff the mean macro-F1 is at least the current base's and no
   task falls by more than `margin`. The decision with every score goes into the candidate's lineage;
4. after a promotion every task with training data gets a head refitted on the new base
   (`potluck.commons.gate.refit_task_model`, frozen encoder, temperature-calibrated on the held-back part), so the
   commons serves all tasks from one encoder (`task_serving.py`).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import or_, select, update

from potluck.commons.errors import Conflict
from potluck.commons.formats import WEIGHTS_FILE, read_manifest, store_base_weights
from potluck.commons.models import BaseVersion, Contribution, Contributor
from potluck.commons.round_settings import RoundSettings
from potluck.data import LabelledData
from potluck.errors import UserError
from potluck.fileio import atomic_folder
from potluck.folder import read_meta
from potluck.splits import stratified_split

logger = logging.getLogger(__name__)

ROUND_LOCK = threading.Lock()  # one round at a time in this process


# -- materialising bases and contributions as folders ----------------------------------------------

def base_folder(commons, version: int) -> Path:
    """Base `version` as a Hugging Face folder under ROOT/bases/vN: links to its blobs, re-hashed once."""
    folder = commons.root / "bases" / f"v{version}"
    if (folder / WEIGHTS_FILE).exists():
        return folder
    manifest = read_manifest(commons.store.read_bytes(commons.registry.base(version).manifest_sha))
    with atomic_folder(folder, overwrite=True) as tmp:  # the commons' own cache
        for name, sha in manifest["files"].items():
            (tmp / name).symlink_to(commons.store.verify(sha).resolve())
    return folder


def contribution_folder(commons, work: Path, record: dict) -> Path:
    """A weights contribution as a model folder for `fuse`: its file (body + `head.*`), re-hashed."""
    folder = work / f"contribution-{record['id']}"
    folder.mkdir(parents=True)
    (folder / WEIGHTS_FILE).symlink_to(commons.store.verify(record["blob_sha"]).resolve())
    return folder


# -- the commons' labelled data per task ----------------------------------------------------------

@dataclass
class TaskExamples:
    """A task's shared data: the train parts and the held-back (or eval-only) parts."""

    train: LabelledData
    held: LabelledData
    eval_only: bool = False  # no train part: the gate splits the held-back data; no served head from it


def read_jsonl(commons, sha: str, name: str) -> LabelledData:
    """A stored dataset part (JSONL of text and label, written by the commons itself), hash-checked."""
    texts, labels = [], []
    for line in commons.store.read_bytes(sha).decode("utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            texts.append(row["text"])
            labels.append(str(row["label"]))
    return LabelledData(texts, labels, path=name)


def sample(data: LabelledData, n: int, seed: int) -> LabelledData:
    """At most n examples, stratified by label."""
    if len(data) <= n:
        return data
    return stratified_split(data, n / len(data), seed=seed)[1]


def task_examples(commons, settings: RoundSettings) -> dict[str, TaskExamples]:
    """Every task with evaluation data in the commons, with its train and held-back examples."""
    parts: dict[str, tuple[list, list]] = {}
    for c in commons.registry.contributions(kind="dataset", status="accepted", limit=100000):
        train, held = parts.setdefault(c["task_name"], ([], []))
        if c["blob_sha"] and not c["eval_only"]:
            train.append(read_jsonl(commons, c["blob_sha"], f"dataset {c['id']} (train)"))
        if c["eval_sha"] and c["n_eval"]:
            held.append(read_jsonl(commons, c["eval_sha"], f"dataset {c['id']} (held back)"))
    out = {}
    for task, (train_parts, held_parts) in sorted(parts.items()):
        train, held = concat(train_parts, task), concat(held_parts, task)
        if not len(held):
            continue
        eval_only = len(set(train.labels)) < 2
        if eval_only:  # evaluation-only: train the gate's head on half of it
            try:
                train, held = stratified_split(held, 0.5, seed=settings.seed)
            except (UserError, ValueError):
                logger.warning("task %s: too little evaluation data to judge a base with; left out", task)
                continue
        known = set(train.labels)
        held = LabelledData([t for t, y in zip(held.texts, held.labels, strict=True) if y in known],
                            [y for y in held.labels if y in known], path=held.path)
        if len(set(train.labels)) >= 2 and len(held):
            out[task] = TaskExamples(sample(train, settings.max_examples, settings.seed), held, eval_only)
    return out


def concat(parts: list[LabelledData], task: str) -> LabelledData:
    return LabelledData([t for p in parts for t in p.texts], [y for p in parts for y in p.labels], path=f"task {task}")


# -- the round ------------------------------------------------------------------------------------

def run_round(commons, actor: Contributor, settings: RoundSettings) -> dict:
    """One fusion round (see the module docstring); returns what happened, with every score."""
    from potluck.commons.gate import GateSettings
    from potluck.fusion import FusionSettings

    fusion = FusionSettings(method=settings.method, weights=settings.weights, trim=settings.trim,
                            density=settings.density)
    gate = GateSettings(margin=settings.margin, full_finetune_epochs=settings.full_finetune_epochs, seed=settings.seed)
    if not ROUND_LOCK.acquire(blocking=False):
        raise Conflict("a round is already running on this commons; wait for it to finish")
    try:
        return _round(commons, actor, settings, fusion, gate)
    finally:
        ROUND_LOCK.release()


def _round(commons, actor, settings: RoundSettings, fusion, gate) -> dict:
    from potluck.commons.gate import TaskData, run_gate

    current = commons.registry.current_base()
    pending = available(commons, current.version)
    skipped = {"outcome": "skipped", "current_version": current.version, "contributions": [c["id"] for c in pending]}
    if len(pending) < settings.min_contributions:
        return {**skipped, "reason": f"not enough contributions: {len(pending)} accepted weights contribution(s) "
                                     f"on base version {current.version} not used yet, the round needs at least "
                                     f"{settings.min_contributions} (--min-contributions)"}
    examples = task_examples(commons, settings)
    if not examples:
        return {**skipped, "reason": "no task has evaluation data, so no candidate could be judged: share a "
                                     "dataset (it is split, part held back) or one with --eval-only"}
    work = commons.root / "work" / f"round-{uuid.uuid4().hex[:12]}"
    work.mkdir(parents=True)
    try:
        parent = base_folder(commons, current.version)
        candidate = _fuse(commons, actor, current, pending, parent, work, settings, fusion)
        tasks = {name: TaskData(e.train.texts, e.train.labels, e.held.texts, e.held.labels)
                 for name, e in examples.items()}
        try:
            decision = run_gate(base_folder(commons, candidate.version), parent, tasks, gate)
        except (UserError, ValueError, RuntimeError) as err:  # e.g. non-finite features from a blown-up body
            return gate_failed(commons, candidate.version, current.version, pending, err)
        except Exception as err:  # a bug: the candidate was never judged; its contributions must not be lost
            commons.registry.set_base_status(candidate.version, "rejected", {
                "decision": f"rejected: the round stopped ({err.__class__.__name__}) before the gate's verdict"})
            release(commons, candidate.version, pending)
            raise
        record = decision.to_dict()
        record["settings"] = {k: v for k, v in record["settings"].items() if k not in ("candidate", "current")}
        status = "promoted" if decision.promote else "rejected"
        scores = {t: s["candidate"] for t, s in decision.scores.items()}
        commons.registry.set_base_status(candidate.version, status, {
            "gate": record, "scores": scores, "decision": decision.reason,
            "eval_examples": {t: len(e.held) for t, e in examples.items()}})
        released = [] if decision.promote else release(commons, candidate.version, pending)
        commons.registry.set_base_status(current.version, "promoted", {
            "scores": {t: s["current"] for t, s in decision.scores.items()}, "scored_in_round": candidate.version})
        heads = refit_heads(commons, candidate.version, examples, gate, work) if decision.promote else []
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("round: candidate %d %s (%s)", candidate.version, status, decision.reason)
    return {"outcome": status, "reason": decision.reason, "candidate_version": candidate.version,
            "current_version": candidate.version if decision.promote else current.version,
            "parent": current.version, "method": settings.method, "contributions": [c["id"] for c in pending],
            "scores": decision.scores, "mean_candidate": decision.mean_candidate,
            "mean_current": decision.mean_current, "margin": settings.margin, "heads": heads, "released": released}


def available(commons, version: int) -> list[dict]:
    """Accepted weights on base `version` that no promoted round used and no running round holds, oldest first.

    One still marked as fused into a rejected candidate (kept by a round before releases existed, or by a
    round stopped between its verdict and the release) is available too: only a promotion uses weights up.
    """
    rejected = {b.version for b in commons.registry.bases() if b.status == "rejected"}
    pending = [c for c in commons.registry.contributions(kind="weights", status="accepted", base_version=version,
                                                         limit=100000)
               if c["fused_into"] is None or c["fused_into"] in rejected]
    return sorted(pending, key=lambda c: c["id"])


def release(commons, version: int, pending: list[dict]) -> list[int]:
    """Give the contributions rejected candidate `version` claimed back to the next round; their ids."""
    ids = [c["id"] for c in pending]
    with commons.registry.transaction() as s:
        s.execute(update(Contribution).where(Contribution.id.in_(ids), Contribution.fused_into == version)
                  .values(fused_into=None))
    commons.registry.set_base_status(version, "rejected", {"released": ids})
    return ids


def claim(commons, version: int, ids: list[int]) -> int:
    """Mark the free ones of `ids` as fused into candidate `version`, in one UPDATE; how many it took.

    Free: fused into nothing, or into a rejected candidate. Another round (another process) that took some
    first makes the count fall short, and the caller stops.
    """
    free = or_(Contribution.fused_into.is_(None),
               Contribution.fused_into.in_(select(BaseVersion.version).where(BaseVersion.status == "rejected")))
    with commons.registry.transaction() as s:
        return s.execute(update(Contribution).where(Contribution.id.in_(ids), free)
                         .values(fused_into=version)).rowcount


def gate_failed(commons, version: int, current: int, pending: list[dict], err: Exception) -> dict:
    """The gate could not score the candidate: reject it with the reason, release its contributions."""
    reason = (f"rejected: the gate could not score the candidate ({err.__class__.__name__}: "
              f"{str(err).splitlines()[0][:300]}); its contributions were released for another round")
    commons.registry.set_base_status(version, "rejected", {"decision": reason})
    ids = release(commons, version, pending)
    logger.warning("round: candidate %d %s", version, reason)
    return {"outcome": "rejected", "reason": reason, "candidate_version": version, "current_version": current,
            "parent": current, "contributions": ids, "scores": {}, "heads": [], "released": ids}


def _fuse(commons, actor, current, pending: list[dict], parent: Path, work: Path, settings: RoundSettings, fusion):
    """Fuse the contributions' bodies into a stored candidate base; mark them fused into it."""
    from potluck.fusion import fuse

    folders = [contribution_folder(commons, work, c) for c in pending]
    weights = [float(max(c["n_examples"], 1)) for c in pending] if settings.weights == "examples" else None
    if weights is not None:
        fusion.weights = "equal"  # the explicit example counts below take its place
    result = fuse(folders, work / "candidate", base=parent, settings=fusion, weights=weights,
                  command=f"potluck commons round --method {settings.method}")
    manifest_sha, weights_sha, spec = store_base_weights(
        commons.store, read_manifest(commons.store.read_bytes(current.manifest_sha)), result.out / WEIGHTS_FILE)
    if spec != current.spec:
        raise Conflict("the fused encoder's tensors differ from the base's; the round stopped")
    inputs = [{"contribution": c["id"], "contributor": c["contributor_name"], "task": c["task_name"],
               "n_examples": c["n_examples"], "weight": i["weight"], "task_vector_norm": i["task_vector_norm"]}
              for c, i in zip(pending, result.meta["inputs"], strict=True)]
    lineage = {"contributions": [c["id"] for c in pending], "method": settings.method,
               "parameters": result.meta["parameters"], "inputs": inputs, "round": settings.to_dict(),
               "fusion_seconds": round(result.seconds, 2)}
    candidate = commons.registry.add_base(manifest_sha=manifest_sha, weights_sha=weights_sha, spec=spec,
                                          method=f"fusion:{settings.method}", parent=current.version,
                                          lineage=lineage, status="candidate", created_by=actor.id)
    if claim(commons, candidate.version, lineage["contributions"]) != len(pending):
        commons.registry.set_base_status(candidate.version, "rejected",
                                         {"decision": "another round fused some of these contributions first"})
        release(commons, candidate.version, pending)  # those this candidate did claim
        raise Conflict("another round fused some of these contributions first; run the round again")
    return candidate


def refit_heads(commons, version: int, examples: dict[str, TaskExamples], gate, work: Path) -> list[dict]:
    """A frozen-encoder head per task with training data, on base `version`, stored as that task's head."""
    from dataclasses import replace

    from safetensors.torch import load_file, save

    from potluck.commons.gate import refit_task_model

    folder, made = base_folder(commons, version), []
    settings = replace(gate, full_finetune_epochs=0)  # heads only: every task served from one encoder
    for name, e in examples.items():
        if e.eval_only:
            continue  # an evaluation-only task: its data judges bases, it does not train served heads
        out = refit_task_model(folder, e.train.texts, e.train.labels, work / "heads" / name, settings=settings,
                               valid=(e.held.texts, e.held.labels),
                               command=f"potluck commons round (head refit on base {version})")
        config = json.loads((out / "config.json").read_text())
        labels = [config["id2label"][k] for k in sorted(config["id2label"], key=int)]
        tensors = {k: v for k, v in load_file(out / WEIGHTS_FILE).items() if k.startswith("classifier.")}
        sha = commons.store.put_bytes(save(tensors, metadata={"format": "potluck.head/1", "labels": json.dumps(labels)}))
        meta = read_meta(out)
        metrics = {k: v for k, v in meta["metrics"]["valid"].items() if isinstance(v, int | float)}
        head = commons.registry.add_task_head(task=commons.registry.task(name), base_version=version, blob_sha=sha,
                                              labels=labels, metrics=metrics)
        made.append({"task": name, "head": head.id, "valid_macro_f1": metrics.get("macro_f1")})
    return made
