"""Train a BERT-style WordPiece tokenizer on a corpus, saved so `AutoTokenizer` loads it.

    potluck tokenizer --corpus texts/ --vocab-size 16000 --out tok/

    from potluck.tokenization import train_tokenizer, save_tokenizer
    tokenizer = train_tokenizer(corpus.documents, vocab_size=16000)   # a PreTrainedTokenizerFast
    save_tokenizer(tokenizer, "tok/", corpus=corpus)

The `tokenizers` library does the work: BERT normaliser (lower-casing and accent stripping unless
cased) and pre-tokeniser, the WordPiece trainer with "##" continuation pieces, the special tokens
[PAD] [UNK] [CLS] [SEP] [MASK], a `[CLS] A [SEP] (B [SEP])` post-processor and a WordPiece decoder.
It is wrapped in transformers' `PreTrainedTokenizerFast(tokenizer_object=...)`: in transformers 5,
`BertTokenizerFast(vocab_file=...)` silently ignores the vocabulary.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from potluck.errors import UserError
from potluck.folder import new_meta, write_folder

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MIN_VOCAB, MAX_VOCAB = 100, 1_000_000
MODEL_MAX_LENGTH = 512  # the position embeddings of every size Potluck pre-trains


def train_tokenizer(texts: Sequence[str] | Iterable[str], vocab_size: int = 16000, *, lowercase: bool = True,
                    min_frequency: int = 2, limit_alphabet: int = 1000):
    """A WordPiece tokenizer learned from `texts`, as a transformers `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise UserError(f"vocab size {vocab_size} is out of range",
                        hint=f"use between {MIN_VOCAB} and {MAX_VOCAB} (BERT uses 30522; 8000-16000 suit a small corpus)")
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=SPECIAL_TOKENS, limit_alphabet=limit_alphabet,
                                        continuing_subword_prefix="##", show_progress=False)
    length = len(texts) if isinstance(texts, Sequence) else None
    backend.train_from_iterator(iter(texts), trainer=trainer, length=length)
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                        model_max_length=MODEL_MAX_LENGTH, do_lower_case=lowercase,
                                        model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    got = backend.get_vocab_size()
    if got < vocab_size:
        logger.info("the corpus gave %d tokens, fewer than the %d asked for", got, vocab_size)
    logger.info("trained a WordPiece tokenizer: %d tokens (%s)", got, "uncased" if lowercase else "cased")
    return tokenizer


def save_tokenizer(tokenizer, folder: str | os.PathLike, *, corpus=None, vocab_size: int | None = None,
                   overwrite: bool = False) -> Path:
    """Write the tokenizer files and a potluck.json (corpus fingerprint, sizes) atomically."""
    meta = new_meta("potluck.tokenizer/1", vocab_size=len(tokenizer), vocab_size_asked=vocab_size,
                    lowercase=bool(getattr(tokenizer, "init_kwargs", {}).get("do_lower_case", True)))
    if corpus is not None:
        meta["corpus"] = {"fingerprint": corpus.fingerprint(), "documents": len(corpus),
                          "characters": corpus.n_characters()}
    write_folder(folder, meta, tokenizer.save_pretrained, overwrite=overwrite, card=False)
    logger.info("saved the tokenizer to %s", folder)
    return Path(folder)


def load_tokenizer(folder: str | os.PathLike):
    """A tokenizer folder (ours or any Hugging Face one) through AutoTokenizer, checked for a [MASK] token."""
    from transformers import AutoTokenizer

    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"no such tokenizer folder: {path}", hint="make one with `potluck tokenizer --out FOLDER`")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"{path} holds no loadable tokenizer ({err.__class__.__name__})",
                        hint="make one with `potluck tokenizer --out FOLDER`") from err
    check_mlm_tokenizer(tokenizer, str(path))
    return tokenizer


def check_mlm_tokenizer(tokenizer, where: str) -> None:
    """Refuse tokenizers that cannot do masked-LM: no fast backend, or no [MASK]/[CLS]/[SEP]/[PAD]."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"the tokenizer of {where} is not a fast tokenizer", hint="use a tokenizer.json tokenizer")
    for role in ("mask", "cls", "sep", "pad"):
        if getattr(tokenizer, f"{role}_token_id", None) is None:
            raise UserError(f"the tokenizer of {where} has no {role} token",
                            hint="masked-LM needs [MASK], [CLS], [SEP] and [PAD]: train one with `potluck tokenizer`")
