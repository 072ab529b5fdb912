import torch

from potluck.batching import inference_batches, pad, training_batches


def test_training_batches_cover_every_index_once_and_repeat_for_a_seed():
    lengths = [(i * 37) % 50 + 1 for i in range(203)]
    batches = training_batches(lengths, 8, seed=1, epoch=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(203))
    assert batches == training_batches(lengths, 8, seed=1, epoch=0)
    assert batches != training_batches(lengths, 8, seed=1, epoch=1)


def test_training_batches_group_similar_lengths():
    lengths = [(i * 37) % 50 + 1 for i in range(400)]
    batches = training_batches(lengths, 8, seed=0, epoch=0)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 5  # random batches of 8 would spread by ~38


def test_training_batches_shard_evenly_across_ranks():
    lengths = list(range(1, 101))
    shards = [training_batches(lengths, 4, seed=0, epoch=0, world_size=3, rank=r) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    seen = [i for s in shards for b in s for i in b]
    assert len(seen) == len(set(seen))


def test_inference_batches_respect_size_and_token_budget():
    lengths = [5, 100, 7, 60, 3, 100]
    batches = list(inference_batches(lengths, batch_size=3, max_tokens=200))
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) <= 3 and len(b) * max(lengths[i] for i in b) <= 200


def test_pad_builds_ids_and_mask():
    ids, mask = pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == torch.long
