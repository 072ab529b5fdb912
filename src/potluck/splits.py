"""Training and validation parts of labelled data: a stratified split, and what potluck.json says of them.

    train, valid, source, warnings = training_split(data, None, fraction=0.1, seed=0)
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict

from potluck.data import DataError, LabelledData, _labels_of, check_training_data

logger = logging.getLogger(__name__)


def training_split(train: LabelledData, valid: LabelledData | None, fraction: float,
                   seed: int) -> tuple[LabelledData, LabelledData, str, list[str]]:
    """The data checks, then (train, valid, where valid came from, warnings): `valid` as given, or a
    stratified `fraction` of `train`."""
    warnings = check_training_data(train, valid)
    if valid is not None:
        return train, valid, valid.path or "given", warnings
    train, valid = stratified_split(train, fraction, seed=seed)
    return train, valid, f"{fraction:.0%} stratified split", warnings


def data_record(train: LabelledData, valid: LabelledData, valid_source: str) -> dict:
    """What potluck.json says of a model's data: sizes, fingerprint, where validation came from, counts."""
    return {"train_path": train.path, "n_train": len(train), "n_valid": len(valid), "fingerprint": train.fingerprint(),
            "valid_source": valid_source, "label_counts": train.label_counts()}


def stratified_split(data: LabelledData, fraction: float = 0.1, *, seed: int = 0,
                     min_valid: int = 1) -> tuple[LabelledData, LabelledData]:
    """Split into (train, valid), deterministic for a seed, keeping the original order within each part.

    Every class with >= 2 examples gets at least one in valid; every class keeps one in train (single
    examples stay in train). sklearn's stratified split does the work; it does not guarantee a small class a
    place in valid, so that is fixed by hand afterwards.
    """
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be between 0 and 1, got {fraction}")
    labels = _labels_of(data, "training")
    counts = Counter(labels)
    pool = [i for i, label in enumerate(labels) if counts[label] >= 2]
    n_classes = len({labels[i] for i in pool})
    if not pool:
        raise DataError("cannot make a validation split: every class has a single example", path=data.path,
                        hint="Add more examples, or pass a separate validation file")
    size = max(round(fraction * len(data)), min_valid, n_classes)
    size = min(size, len(pool) - n_classes)  # train keeps one example of every class
    keep, held = train_test_split(pool, test_size=size, random_state=seed, shuffle=True,
                                  stratify=[labels[i] for i in pool])
    sides: dict[str, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for side, indices in enumerate((keep, held)):
        for i in indices:
            sides[labels[i]][side].append(i)
    for train_part, valid_part in sides.values():  # sklearn may leave a small class out of one side
        for source, target in ((train_part, valid_part), (valid_part, train_part)):
            if not target:
                target.append(source.pop(source.index(min(source))))
    held = {i for _, valid_part in sides.values() for i in valid_part}
    train_idx = sorted(set(range(len(data))) - held)
    logger.info("split %s: %d train, %d valid", data.path or "data", len(train_idx), len(held))
    return data.select(train_idx), data.select(sorted(held))
