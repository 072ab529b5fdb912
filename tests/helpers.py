"""Plain helpers for the tests (imported normally: `from helpers import toy_texts`), never fixtures.

Tiny random encoders are built in code (as transformers' BertModelTester does): 2 layers, 32 wide, a
word-level vocabulary, so unit tests run in seconds and offline. The fixtures that use these helpers
(`tiny_encoder`, `toy_data`) are in conftest.py.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

WORDS = ("the a is was server down site slow payment failed card login password invoice thanks please help "
         "urgent now today customers cannot pay refund broken error crash outage hello question feature "
         "request how do i change my address email billing plan great love nice next week month call "
         "data lost security breach locked account weather cat dog paris london red blue green").split()


def make_tiny_encoder(folder: Path, *, layers: int = 2, hidden: int = 32, seed: int = 0, dropout: float = 0.1) -> Path:
    """A random BERT encoder (no head) with a WordPiece tokenizer, saved as a Hugging Face folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS)),
             *"abcdefghijklmnopqrstuvwxyz0123456789.,!?'", *[f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab))}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    tokenizer.save_pretrained(folder)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=hidden * 2, max_position_embeddings=256,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    return folder


def toy_texts(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """An easy two-class problem: 'urgent' texts mention outages, 'calm' texts mention pleasantries."""
    rng = random.Random(seed)
    urgent = "server down site crash outage payment failed customers cannot pay breach locked now".split()
    calm = "thanks question feature request great love nice next week month hello weather".split()
    texts, labels = [], []
    for i in range(n):
        label = "urgent" if i % 2 == 0 else "calm"
        words = rng.sample(urgent if label == "urgent" else calm, 4) + rng.sample(["the", "a", "is", "today"], 2)
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def shared_dataset(name: str, split: str = "train") -> Path:
    path = SHARED_DATA / name / f"{split}.jsonl"
    if not path.exists():
        pytest.fail(f"{path} is missing: the integration tests need ../shared/data beside the repo")
    return path
