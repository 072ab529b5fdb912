"""WordPiece tokenizer training: special tokens, round trip, AutoTokenizer loading, clear errors."""

import json

import pytest

from potluck.corpus import read_corpus
from potluck.errors import UserError
from potluck.tokenization import SPECIAL_TOKENS, load_tokenizer, save_tokenizer, train_tokenizer

TEXTS = [f"The payment of invoice {i} was declined twice, said the customer from Zürich." for i in range(200)] + \
        [f"Login failures on server {i % 7} are unbelievable; please help us today." for i in range(200)]


@pytest.fixture(scope="module")
def trained():
    return train_tokenizer(TEXTS, vocab_size=300, min_frequency=1)


def test_special_tokens_come_first_and_are_wired(trained):
    assert trained.convert_ids_to_tokens(list(range(5))) == SPECIAL_TOKENS
    assert (trained.pad_token, trained.unk_token, trained.cls_token, trained.sep_token, trained.mask_token) == \
        ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    ids = trained("payment declined")["input_ids"]
    assert ids[0] == trained.cls_token_id and ids[-1] == trained.sep_token_id
    pair = trained("payment", "declined")
    assert pair["token_type_ids"][-2:] == [1, 1]


def test_round_trip_lowercases_and_splits_unseen_words_into_pieces(trained):
    text = "The payment was declined twice"
    ids = trained(text, add_special_tokens=False)["input_ids"]
    assert trained.decode(ids) == text.lower()
    pieces = trained.tokenize("unbelievably")
    assert len(pieces) > 1 and all(p.startswith("##") for p in pieces[1:])
    assert "[UNK]" not in trained.tokenize("zurich declined")  # accents stripped, as BERT uncased


def test_saved_folder_loads_with_auto_tokenizer(trained, tmp_path):
    from transformers import AutoTokenizer

    corpus = read_corpus(_write(tmp_path / "c.txt", "\n".join(TEXTS)))
    save_tokenizer(trained, tmp_path / "tok", corpus=corpus, vocab_size=300)
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "Login failures on server 3 were declined"
    assert loaded(text)["input_ids"] == trained(text)["input_ids"]
    assert loaded.mask_token == "[MASK]" and loaded.model_max_length == 512
    meta = json.loads((tmp_path / "tok" / "potluck.json").read_text())
    assert meta["vocab_size"] == len(trained) and meta["corpus"]["fingerprint"] == corpus.fingerprint()
    assert load_tokenizer(tmp_path / "tok").mask_token_id == 4


def test_cased_tokenizer_keeps_case():
    tok = train_tokenizer(TEXTS, vocab_size=300, lowercase=False, min_frequency=1)
    assert tok.decode(tok("The payment", add_special_tokens=False)["input_ids"]) == "The payment"


@pytest.mark.parametrize("size", [10, 10_000_000])
def test_vocab_size_out_of_range_is_a_user_error(size):
    with pytest.raises(UserError, match="vocab size"):
        train_tokenizer(TEXTS, vocab_size=size)


def test_loading_a_missing_or_empty_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such tokenizer folder"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no loadable tokenizer"):
        load_tokenizer(tmp_path / "empty")


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path
