"""Length-bucketed batches with dynamic padding, shared by training and inference.

Transformers on a CPU spend their time on padding if you let them: a batch is as long as its longest
text. Sorting by length before batching keeps every batch tight. Training shuffles first and sorts
only inside "mega-batches" of 50 batches, so batches stay random in content (the same trick as
transformers' `LengthGroupedSampler`, written here because we also need the order back at inference).
`run_batches` runs a model over such batches and puts the answers back in order: the predictor's
batches, and the training loops' validation logits (`batched_logits`, under autocast).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

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


def run_batches(model, ids: Sequence[Sequence[int]], *, pad_id: int, device: torch.device,
                batch_size: int, max_tokens: int | None, pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """Logits (N, C) float32 of an eval-mode model, batched by length, in the original order; the
    batches on `pool`'s threads (None: in this thread). A FastBert runs each batch unpadded; a
    transformers model gets it padded."""
    classes = model.num_labels if hasattr(model, "classify") else model.config.num_labels
    out = np.zeros((len(ids), classes), dtype=np.float32)
    batches = list(inference_batches([len(row) for row in ids], batch_size, max_tokens))
    run = functools.partial(_run_batch, model, ids, pad_id, device)
    for batch, logits in zip(batches, pool.map(run, batches) if pool is not None else map(run, batches), strict=True):
        out[batch] = logits
    return out


@torch.inference_mode()  # per thread: the workers enter it here
def _run_batch(model, ids: Sequence[Sequence[int]], pad_id: int, device: torch.device,
               batch: list[int]) -> np.ndarray:
    rows = [ids[i] for i in batch]
    if hasattr(model, "classify"):  # FastBert, or the ONNX Runtime runner
        return np.asarray(model.classify(rows), dtype=np.float32)
    input_ids, mask = pad(rows, pad_id)  # (B, T)
    return model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float().cpu().numpy()


@torch.inference_mode()
def batched_logits(model, ids: Sequence[Sequence[int]], *, pad_id: int, bf16: bool = False,
                   device: torch.device | str = "cpu", batch_size: int = 64,
                   max_tokens: int | None = 16384) -> np.ndarray:
    """Logits (N, C) as float32 for token-id lists, in their original order.

    `bf16` runs under autocast (the weights stay fp32, as during training). One autocast region spans
    all batches, so each weight is cast to bf16 once per call, not once per batch.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):  # autocast is per thread: run here
        out = run_batches(model, ids, pad_id=pad_id, device=device, batch_size=batch_size, max_tokens=max_tokens)
    model.train(was_training)
    return out
