"""Length-bucketed batches with dynamic padding, shared by training and inference.

Transformers on a CPU spend their time on padding if you let them: a batch is as long as its longest
text. Sorting by length before batching keeps every batch tight. Training shuffles first and sorts
only inside "mega-batches" of 50 batches, so batches stay random in content (the same trick as
transformers' `LengthGroupedSampler`, written here because we also need the order back at inference).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

MEGABATCH = 50


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to max_length, without padding."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False,
                        return_attention_mask=False, return_token_type_ids=False)
    return encoded["input_ids"]


def training_batches(lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int,
                     world_size: int = 1, rank: int = 0) -> list[list[int]]:
    """Shuffled batches of indices, each of similar lengths; the same for a given (seed, epoch).

    With world_size > 1 every rank gets the same number of batches (the list is cut to a multiple of
    world_size) and rank r takes batches r, r + world_size, ...
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    lengths = np.asarray(lengths)
    batches: list[list[int]] = []
    mega = batch_size * MEGABATCH
    for start in range(0, len(order), mega):
        chunk = order[start:start + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size].tolist() for i in range(0, len(chunk), batch_size))
    perm = rng.permutation(len(batches))
    batches = [batches[i] for i in perm]
    if world_size > 1:
        usable = len(batches) - len(batches) % world_size
        batches = batches[rank:usable:world_size]
    return batches


def inference_batches(lengths: Sequence[int], batch_size: int,
                      max_tokens: int | None = None) -> Iterator[list[int]]:
    """Indices sorted by length (longest first), cut into batches of at most batch_size texts and
    at most max_tokens padded tokens. The caller puts results back with the indices."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batch: list[int] = []
    for index in order.tolist():
        # the first text of a batch is its longest, so padded size = len(batch) * lengths[batch[0]]
        longest = lengths[batch[0]] if batch else lengths[index]
        if batch and (len(batch) >= batch_size or (max_tokens and (len(batch) + 1) * longest > max_tokens)):
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch


def pad(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a batch to its longest row: (input_ids, attention_mask), both (B, T) int64."""
    longest = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)  # (B, T)
    for i, row in enumerate(ids):
        input_ids[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return input_ids, mask
