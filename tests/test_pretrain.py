"""Masked-LM pre-training with tiny models on generated corpora: corpus reading and its errors, packing,
masking, loss falling, the planted word filled in, exact resume, continued pre-training from an encoder
without an MLM head, and an output folder that fill-mask pipelines and fine-tuning both load."""

import json
import random
import sys

import numpy as np
import pytest
import torch
from helpers import WORDS, shared_dataset, toy_texts

from potluck.corpus import Corpus, pack_blocks, read_corpus
from potluck.data import DataError
from potluck.errors import UserError
from potluck.mlm import Masker, fill_mask
from potluck.pretrain import PretrainSettings, pretrain
from potluck.tokenization import save_tokenizer, train_tokenizer

PLANTED = "the payment was declined twice ."


def planted_corpus(n: int = 300, seed: int = 0) -> Corpus:
    """Each document is the planted sentence then 23 words drawn from 20: '[MASK]' in the sentence has one
    right answer, 'declined'. Every document is 29 tokens, so with its [SEP] it fills exactly one piece of a
    32-token block and the sentence always sits at the start of a block: a tiny model learns it in ~100 steps."""
    rng = random.Random(seed)
    docs = [f"{PLANTED} {' '.join(rng.choices(WORDS[:20], k=23))}" for _ in range(n)]
    return Corpus(docs, [("generated", n)])


def tiny_settings(**overrides) -> PretrainSettings:
    base = {"size": "tiny", "block_size": 32, "batch_size": 16, "epochs": 100, "max_steps": 40,
            "learning_rate": 3e-3, "eval_every": 0, "checkpoint_every": 0, "valid_blocks": 16,
            "valid_fraction": 0.1, "precision": "fp32"}
    return PretrainSettings(**{**base, **overrides})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: tiny models gain nothing from two, and lose a lot when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus():
    return planted_corpus()


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok") / "tok"
    save_tokenizer(train_tokenizer(corpus.documents, vocab_size=200, min_frequency=1), folder, corpus=corpus)
    return folder


@pytest.fixture(scope="module")
def encoder(corpus, tok_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("enc") / "enc"
    result = pretrain(corpus, out, settings=tiny_settings(max_steps=100, eval_every=50), tokenizer=tok_dir)
    return out, result


# -- corpus ---------------------------------------------------------------------------------------

def test_corpus_reads_folders_lines_files_and_text_columns(tmp_path):
    (tmp_path / "texts" / "sub").mkdir(parents=True)
    (tmp_path / "texts" / "a.txt").write_text("first line\n\n  second line  \n")
    (tmp_path / "texts" / "sub" / "b").write_text("no suffix is plain text\n")
    (tmp_path / "texts" / ".hidden.txt").write_text("skipped\n")
    (tmp_path / "texts" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "texts" / "empty.txt").write_text("")
    (tmp_path / "labelled.csv").write_text("text,label\nthe card was declined,billing\nhello there,other\n")
    (tmp_path / "rows.jsonl").write_text('{"body": "one"}\n{"body": "two"}\n')
    corpus = read_corpus([tmp_path / "texts", tmp_path / "labelled.csv"])
    assert corpus.documents == ["first line", "second line", "no suffix is plain text",
                                "the card was declined", "hello there"]
    assert read_corpus(tmp_path / "texts", per_file=True).documents == ["first line\n\n  second line",
                                                                        "no suffix is plain text"]
    assert read_corpus(tmp_path / "rows.jsonl", text_column="body").documents == ["one", "two"]
    assert corpus.fingerprint() == read_corpus([tmp_path / "texts", tmp_path / "labelled.csv"]).fingerprint()


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file or folder"),
    ("empty", "the file is empty"),
    ("binary", "binary file, not text"),
    ("latin1", "not UTF-8"),
    ("utf16", "UTF-16, not UTF-8"),
    ("empty_folder", "holds no text files"),
    ("suffix", "unsupported file type"),
    ("column", "no text column 'text'"),
])
def test_bad_corpora_are_one_clear_data_error(tmp_path, case, message):
    path = tmp_path / {"missing": "nope.txt", "empty": "e.txt", "binary": "b.txt", "latin1": "l.txt", "utf16": "u.txt",
                       "empty_folder": "folder", "suffix": "x.pdf", "column": "c.jsonl"}[case]
    if case == "empty":
        path.write_text("  \n")
    elif case == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif case == "latin1":
        path.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    elif case == "utf16":
        path.write_text("hello\n", encoding="utf-16")
    elif case == "empty_folder":
        path.mkdir()
        (path / "notes.docx").write_bytes(b"PK")
    elif case == "suffix":
        path.write_text("text")
    elif case == "column":
        path.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=message) as err:
        read_corpus(path)
    assert "\n" not in str(err.value) and str(path.name) in str(err.value)


def test_pack_blocks_fills_every_block_without_padding():
    docs = [[10, 11, 12], [13], [14, 15, 16, 17, 18], [19, 20]]
    blocks = pack_blocks(docs, 8, cls_id=2, sep_id=3)  # stream of 15 tokens -> two pieces of 6
    assert blocks.tolist() == [[2, 10, 11, 12, 3, 13, 3, 3], [2, 14, 15, 16, 17, 18, 3, 3]]
    assert (blocks != 0).all()


# -- masking --------------------------------------------------------------------------------------

def test_masking_is_15_percent_80_10_10_and_never_touches_special_tokens(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    masker = Masker(tok, 0.15)
    ids = torch.randint(5, len(tok), (64, 128))
    ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
    inputs, labels = masker(ids, torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert abs(chosen[:, 1:-1].float().mean().item() - 0.15) < 0.01
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    assert (labels[chosen] == ids[chosen]).all() and (inputs[~chosen] == ids[~chosen]).all()
    masked = (inputs[chosen] == tok.mask_token_id).float().mean().item()
    kept = (inputs[chosen] == ids[chosen]).float().mean().item()
    assert abs(masked - 0.8) < 0.03 and abs(kept - 0.1) < 0.03
    again, _ = masker(ids, torch.Generator().manual_seed(0))
    assert torch.equal(inputs, again)


def test_whole_word_masking_masks_all_pieces_of_a_word(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    text = " ".join(["unbelievably quizzical paymentology"] * 20)
    ids = torch.tensor([tok(text)["input_ids"]] * 32)  # (32, T)
    pieces = tok.convert_ids_to_tokens(ids[0].tolist())
    starts = [i for i, p in enumerate(pieces) if not p.startswith("##")]
    assert len(starts) < len(pieces) - 5, "the test text must contain multi-piece words"
    _, labels = Masker(tok, 0.15, whole_word=True)(ids, torch.Generator().manual_seed(1))
    chosen = (labels != -100).numpy()
    for begin, end in zip(starts, [*starts[1:], len(pieces)], strict=True):
        word = chosen[:, begin:end]
        assert (word.all(axis=1) | ~word.any(axis=1)).all()  # all pieces or none
    assert 0.05 < chosen.mean() < 0.3


# -- pre-training ---------------------------------------------------------------------------------

def test_loss_falls_and_the_planted_word_is_filled_in(encoder):
    folder, result = encoder
    start, end = result.evals[0], result.evals[-1]
    assert result.steps == 100 and result.stopped_by == "max_steps"
    assert end["loss"] < start["loss"] - 2.0 and end["accuracy"] > 0.25
    assert [e["step"] for e in result.evals] == [0, 50, 100]
    top = fill_mask(folder, PLANTED.replace("declined", "[MASK]"), top_k=3)
    assert len(top) == 1 and top[0][0]["token"] == "declined", top


def test_output_folder_loads_in_the_fill_mask_pipeline_and_records_its_making(encoder, corpus):
    from transformers import pipeline

    folder, result = encoder
    fill = pipeline("fill-mask", model=str(folder))
    assert fill("the payment was [MASK] twice .")[0]["token_str"].strip() == "declined"
    meta = json.loads((folder / "potluck.json").read_text())
    assert meta["corpus"]["fingerprint"] == corpus.fingerprint() and meta["size"] == "tiny"
    assert meta["training"]["steps"] == 100 and meta["metrics"]["held_out"]["loss"] == result.evals[-1]["loss"]
    card = (folder / "README.md").read_text()
    assert corpus.fingerprint()[:16] in card and "100 steps" in card and f"{result.evals[-1]['loss']:.4f}" in card
    assert not list(folder.glob("*.bin")) and (folder / "model.safetensors").is_file()


def test_output_folder_is_a_finetune_base(encoder):
    from potluck import TextClassifier

    texts, labels = toy_texts(60)
    clf = TextClassifier(base=str(encoder[0]), epochs=1, batch_size=8, precision="fp32").fit(texts, labels)
    assert clf.predict_proba(texts[:3]).shape == (3, 2)


def test_resume_continues_from_the_right_step_and_matches_an_unbroken_run(corpus, tok_dir, tmp_path):
    settings = tiny_settings(max_steps=8, checkpoint_every=4)
    unbroken = pretrain(corpus, tmp_path / "a", settings=settings, tokenizer=tok_dir)

    def crash(event):
        if event.get("step") == 6 and not event.get("eval"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(corpus, tmp_path / "b", settings=settings, tokenizer=tok_dir,
                 checkpoint_dir=tmp_path / "ckpt", on_step=crash)
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step-0000004"]
    steps = []
    resumed = pretrain(corpus, tmp_path / "b", settings=settings, tokenizer=tok_dir, checkpoint_dir=tmp_path / "ckpt",
                       resume=True, on_step=lambda e: steps.append(e["step"]) if "loss" in e and not e.get("eval") else None)
    assert steps == [5, 6, 7, 8] and resumed.steps == 8
    assert [round(r["loss"], 4) for r in resumed.history] == [round(r["loss"], 4) for r in unbroken.history]
    with pytest.raises(UserError, match="other settings"):
        pretrain(corpus, tmp_path / "c", settings=tiny_settings(max_steps=8, mask_probability=0.2),
                 tokenizer=tok_dir, checkpoint_dir=tmp_path / "ckpt", resume=True)


def test_max_time_stops_the_run_and_schedules_the_decay_to_end_on_time(corpus, tok_dir, tmp_path):
    result = pretrain(corpus, tmp_path / "t", settings=tiny_settings(max_steps=0, max_time=3.0), tokenizer=tok_dir)
    assert result.stopped_by == "max_time" and result.seconds < 15
    assert result.history[-1]["lr"] < 0.5 * max(r["lr"] for r in result.history)


def test_a_diverging_run_stops_with_a_clear_error_and_writes_nothing(corpus, tok_dir, tmp_path):
    with pytest.raises(UserError, match="training diverged"):
        pretrain(corpus, tmp_path / "nan", settings=tiny_settings(max_steps=20, learning_rate=1e8, warmup_ratio=0),
                 tokenizer=tok_dir)
    assert not (tmp_path / "nan").exists()


def test_continued_pretraining_ties_a_new_head_to_the_input_embeddings(tiny_encoder, tmp_path, caplog):
    from transformers import AutoModelForMaskedLM, BertModel

    docs = Corpus([f"the server is down {i} and customers cannot pay" for i in range(200)], [("g", 200)])
    with caplog.at_level("WARNING"):
        result = pretrain(docs, tmp_path / "adapted", base=str(tiny_encoder),
                          settings=tiny_settings(max_steps=5, learning_rate=1e-3, new_head_steps=3))
    assert "no masked-LM head" in caplog.text and "tied" in caplog.text
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "adapted")
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    assert [round(r["lr"] / 1e-3, 3) for r in result.history[:3]] == [10.0, 10.0, 10.0]  # the head alone first
    base = BertModel.from_pretrained(tiny_encoder)
    assert not torch.equal(model.bert.encoder.layer[0].output.dense.weight, base.encoder.layer[0].output.dense.weight)
    head_only = pretrain(docs, tmp_path / "head-only", base=str(tiny_encoder),
                         settings=tiny_settings(max_steps=3, learning_rate=1e-3, new_head_steps=3))
    frozen = AutoModelForMaskedLM.from_pretrained(tmp_path / "head-only")
    assert head_only.evals[-1]["loss"] < head_only.evals[0]["loss"]
    for name, value in base.state_dict().items():
        if not name.startswith("pooler."):
            assert torch.equal(frozen.bert.state_dict()[name], value), name  # the encoder did not move
    meta = json.loads((tmp_path / "adapted" / "potluck.json").read_text())
    assert meta["base"] == str(tiny_encoder) and "tied" in meta["head"] and result.steps == 5
    # the steps are reported honestly: 3 trained the head alone, 2 the encoder; 0 in the head-only run
    assert (result.head_only_steps, result.encoder_steps) == (3, 2) and meta["training"]["encoder_steps"] == 2
    assert (head_only.head_only_steps, head_only.encoder_steps) == (3, 0)
    # the base's pooler is carried on, so fine-tuning starts from it as it would from the base
    from transformers import AutoModelForSequenceClassification, BertModel

    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "adapted", num_labels=2)
    assert torch.equal(classifier.bert.pooler.dense.weight, BertModel.from_pretrained(tiny_encoder).pooler.dense.weight)
    assert meta["kept_from_base"] == ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]


def test_settings_and_inputs_are_checked(tok_dir, tmp_path):
    with pytest.raises(UserError, match="size must be one of"):
        PretrainSettings(size="huge")
    with pytest.raises(UserError, match="tokenizer to pre-train from scratch"):
        pretrain(planted_corpus(20), tmp_path / "x", settings=tiny_settings())
    with pytest.raises(DataError, match="too small for blocks of 32 tokens"):
        pretrain(Corpus(["the payment", "was declined"], [("two.txt", 2)]), tmp_path / "x",
                 settings=tiny_settings(), tokenizer=tok_dir)
    assert not (tmp_path / "x").exists()


def test_fill_refuses_texts_without_a_mask_and_encoders_without_a_head(encoder, tiny_encoder):
    with pytest.raises(UserError, match=r"no \[MASK\]"):
        fill_mask(encoder[0], "no mask here")
    with pytest.raises(UserError, match="no masked-LM head"):
        fill_mask(tiny_encoder, "the [MASK] is down")


# -- the command line (in-process through `main()`, as the console script runs it) -------------------

def potluck(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    from potluck.cli import main

    monkeypatch.setattr(sys, "argv", ["potluck", *map(str, args)])
    with pytest.raises(SystemExit) as done:
        main()
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


def test_cli_tokenizer_pretrain_fill(corpus, tmp_path, capsys, monkeypatch):
    (tmp_path / "corpus.txt").write_text("\n".join(corpus.documents))
    code, _, err = potluck(capsys, monkeypatch, "tokenizer", "--corpus", tmp_path / "corpus.txt",
                           "--vocab-size", 200, "--out", tmp_path / "tok")
    assert code == 0 and "saved" in err, err
    code, _, err = potluck(capsys, monkeypatch, "pretrain", "--corpus", tmp_path / "corpus.txt", "--tokenizer",
                           tmp_path / "tok", "--out", tmp_path / "enc", "--size", "tiny", "--block-size", 32,
                           "--batch-size", 16, "--max-steps", 30, "--learning-rate", 3e-3, "--valid-fraction", 0.1,
                           "--precision", "fp32")
    assert code == 0 and "held-out loss" in err and "saved" in err, err
    assert not (tmp_path / "enc.checkpoints").exists()
    assert "potluck pretrain --corpus" in json.loads((tmp_path / "enc" / "potluck.json").read_text())["command"]
    code, out, err = potluck(capsys, monkeypatch, "fill", tmp_path / "enc", "the payment was [MASK] twice .",
                             "--top-k", 3)
    assert code == 0, err
    rows = [line.split() for line in out.strip().splitlines()]
    assert len(rows) == 3 and all(0 <= float(r[1]) <= 1 for r in rows)


@pytest.mark.parametrize("args, needle", [
    (("pretrain", "--corpus", "missing.txt", "--out", "x", "--tokenizer", "t"), "no such file or folder"),
    (("pretrain", "--corpus", "CORPUS", "--out", "x"), "give a tokenizer"),
    (("pretrain", "--corpus", "CORPUS", "--out", "x", "--from", "minilm", "--size", "huge"), "size must be one of"),
    (("tokenizer", "--corpus", "BINARY", "--out", "x"), "binary file"),
    (("fill", "MISSING", "a [MASK]"), "not a model folder"),
])
def test_cli_mistakes_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, args, needle):
    (tmp_path / "c.txt").write_text("some text\nmore text\n")
    (tmp_path / "b.txt").write_bytes(b"\x00\x01\x02" * 100)
    swap = {"CORPUS": tmp_path / "c.txt", "BINARY": tmp_path / "b.txt", "MISSING": tmp_path / "none"}
    code, _, err = potluck(capsys, monkeypatch, *[swap.get(a, a) for a in args])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err


def test_blocks_are_deterministic_per_seed(corpus, tok_dir):
    from transformers import AutoTokenizer

    from potluck.pretrain import tokenize_corpus

    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids = tokenize_corpus(tok, corpus.documents)
    blocks = pack_blocks(ids, 32, cls_id=tok.cls_token_id, sep_id=tok.sep_token_id)
    assert blocks.shape[1] == 32 and blocks.shape[0] == sum(len(d) + 1 for d in ids) // 30
    assert np.array_equal(blocks[0, 1:6], ids[0][:5])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_continued_from_the_embedded_minilm_fills_in_and_fine_tunes(tmp_path):
    from potluck import TextClassifier

    texts = read_corpus(shared_dataset("sms_spam")).documents[:400]
    settings = PretrainSettings(block_size=64, batch_size=8, max_steps=3, eval_every=0, checkpoint_every=0,
                                valid_blocks=8, valid_fraction=0.1)
    result = pretrain(Corpus(texts, [("sms_spam", 400)]), tmp_path / "adapted", base="minilm", settings=settings)
    meta = json.loads((tmp_path / "adapted" / "potluck.json").read_text())
    assert result.steps == 3 and meta["base"] == "minilm" and "tied" in meta["head"]
    assert meta["architecture"]["layers"] == 6 and meta["kept_from_base"]
    answers = fill_mask(tmp_path / "adapted", "Call me when you [MASK] home.", top_k=5)
    assert len(answers) == 1 and len(answers[0]) == 5 and sum(a["score"] for a in answers[0]) <= 1.0 + 1e-6
    train, labels = toy_texts(60)
    clf = TextClassifier(base=str(tmp_path / "adapted"), epochs=1, batch_size=16).fit(train, labels)
    assert clf.predict_proba(train[:2]).shape == (2, 2)
