"""potluck tokenizer | pretrain | fill: a WordPiece tokenizer, masked-LM pre-training, and filling masks."""

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from potluck.cli.options import (
    CorpusOption,
    NprocOption,
    OverwriteOption,
    PerFileOption,
    spread_over,
    with_settings,
)
from potluck.cli.render import StepProgress, console, out
from potluck.errors import UserError
from potluck.fileio import check_output
from potluck.pretrain import PretrainSettings

app = typer.Typer()


@app.command("tokenizer")
def tokenizer_command(
    corpus: CorpusOption,
    out_dir: Annotated[Path, typer.Option("--out", help="the tokenizer folder to write")],
    vocab_size: Annotated[int, typer.Option(help="tokens in the vocabulary, special tokens included")] = 16000,
    cased: Annotated[bool, typer.Option(help="keep upper case and accents (default: lower-case, BERT uncased)")] = False,
    min_frequency: Annotated[int, typer.Option(help="a piece must occur this often to be merged")] = 2,
    text_column: Annotated[str, typer.Option(help="column holding the text in JSONL/CSV/TSV/Parquet")] = "text",
    per_file: PerFileOption = False,
    overwrite: OverwriteOption = False,
):
    """Train a BERT-style WordPiece tokenizer on a corpus."""
    from potluck.corpus import read_corpus
    from potluck.tokenization import save_tokenizer, train_tokenizer

    if min_frequency < 1:
        raise UserError(f"--min-frequency must be at least 1, got {min_frequency}")
    check_output(out_dir, overwrite=overwrite)
    docs = read_corpus(corpus, text_column=text_column, per_file=per_file)
    console.print(f"training a WordPiece tokenizer on {len(docs)} documents ({docs.n_characters()} characters)")
    tok = train_tokenizer(docs.documents, vocab_size, lowercase=not cased, min_frequency=min_frequency)
    save_tokenizer(tok, out_dir, corpus=docs, vocab_size=vocab_size, overwrite=overwrite)
    sample = docs.documents[0][:120]
    console.print(f"{len(tok)} tokens; e.g. {' '.join(tok.tokenize(sample)[:24])}", highlight=False)
    console.print(f"saved [bold]{out_dir}[/]")


@app.command("pretrain")
@with_settings(PretrainSettings, "Pre-training")
def pretrain_command(
    corpus: CorpusOption,
    out_dir: Annotated[Path, typer.Option("--out", help="the encoder folder to write")],
    tokenizer: Annotated[Path | None, typer.Option(help="from scratch: a folder from `potluck tokenizer`")] = None,
    base: Annotated[str | None, typer.Option("--from", help="continue from 'minilm', a model folder or a hub id")] = None,
    text_column: Annotated[str, typer.Option(help="column holding the text in JSONL/CSV/TSV/Parquet")] = "text",
    per_file: PerFileOption = False,
    resume: Annotated[bool, typer.Option(help="continue from the last checkpoint (budgets may be raised)")] = False,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="where checkpoints go (default: OUT.checkpoints)")] = None,
    keep_checkpoints: Annotated[bool, typer.Option(help="keep the last checkpoint, to train longer later with --resume")] = False,
    nproc: NprocOption = 1,
    overwrite: OverwriteOption = False,
    **settings,
):
    """Pre-train an encoder by mask filling: from scratch (--tokenizer) or continued (--from)."""
    from potluck import distributed
    from potluck.classifier import remove_checkpoints
    from potluck.corpus import read_corpus
    from potluck.pretrain import check_source, pretrain

    if spread_over(nproc):
        return
    ctx = distributed.context()
    s = PretrainSettings(**settings)
    check_source(tokenizer, base)
    check_output(out_dir, overwrite=overwrite)
    docs = read_corpus(corpus, text_column=text_column, per_file=per_file)
    checkpoint_dir = checkpoint_dir or out_dir.with_name(out_dir.name + ".checkpoints")
    what = f"continuing [bold]{base}[/]" if base else f"a new [bold]{s.size}[/] encoder"
    procs = (f" on {ctx.world_size} processes (effective batch {s.batch_size * s.grad_accumulation} blocks)"
             if ctx.enabled else "")
    if ctx.is_main:
        console.print(f"pre-training {what} on {len(docs)} documents ({docs.n_characters()} characters){procs}")
    with StepProgress("pretrain") as progress:
        result = pretrain(docs, out_dir, settings=s, tokenizer=tokenizer, base=base, checkpoint_dir=checkpoint_dir,
                          resume=resume, on_step=progress.update, command=shlex.join(["potluck", *sys.argv[1:]]),
                          overwrite=overwrite)
    if not ctx.is_main:
        return  # rank 0 wrote the folder and reports
    if not keep_checkpoints:
        remove_checkpoints(checkpoint_dir)
    end = result.evals[-1]
    if result.head_only_steps:
        console.print(f"{result.head_only_steps} of the {result.steps} steps trained the new masked-LM head alone; "
                      f"{result.encoder_steps} trained the encoder", highlight=False)
        if result.encoder_steps == 0:
            console.print(f"[yellow]warning:[/] the encoder itself was not trained: raise --max-steps (or the "
                          f"time budget) past --new-head-steps {s.new_head_steps}")
    console.print(f"{result.steps} steps, {result.tokens} tokens in {result.seconds:.0f} s "
                  f"({result.tokens_per_s:.0f} tokens/s, {'bf16' if result.bf16 else 'fp32'}; stopped by "
                  f"{result.stopped_by}); held-out loss {result.evals[0]['loss']:.3f} -> {end['loss']:.3f}, "
                  f"perplexity {end['perplexity']:.1f}, masked-token accuracy {end['accuracy']:.3f}")
    console.print(f"saved [bold]{out_dir}[/]")


@app.command("fill")
def fill_command(
    model: Annotated[Path, typer.Argument(help="an encoder folder from `potluck pretrain`")],
    texts: Annotated[list[str], typer.Argument(help="texts with [MASK] where a word is missing")],
    top_k: Annotated[int, typer.Option(help="how many words to show per [MASK]")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="print the answers as JSON")] = False,
):
    """Fill in [MASK]: the top-k words with their probabilities."""
    from potluck.mlm import fill_mask

    answers = fill_mask(model, list(texts), top_k=top_k)
    if as_json:
        out.print_json(json.dumps(answers))
        return
    for text, masks in zip(texts, answers, strict=True):
        if len(texts) > 1:
            out.print(text, highlight=False)
        for number, candidates in enumerate(masks, start=1):
            if len(masks) > 1:
                out.print(f"[MASK] {number}:", highlight=False)
            width = max(len(c["token"]) for c in candidates)
            for c in candidates:
                out.print(f"{c['token']:<{width}}  {c['score']:.3f}", highlight=False)
# (end of pre-training section)
