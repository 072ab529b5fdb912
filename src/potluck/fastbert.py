"""An inference-only BERT sequence classifier in plain torch, and a tokenizer without transformers.

    runner = FastBert.from_folder("models/urgency")          # None where the folder is not a BERT classifier
    tokenizer = FastTokenizer.from_folder("models/urgency", max_length=128)
    logits = runner.classify(tokenizer.encode(["The site is down!"]))   # (N, C) float32

Why write the forward pass again (as nanoGPT does for GPT-2, and text-embeddings-inference for BERT)?

- Padding: a batch with more than 10 % padding is run *packed*. The linear layers and the
  feed-forward (~95 % of the work at 128 tokens) run on the real tokens only; attention sorts the
  texts by length and, per block of similar lengths, scatters them into a padded (b, heads, T, d)
  view for `scaled_dot_product_attention` and gathers them back (the CPU kernel's cost grows with
  the padded grid, so one block for a batch of lengths 20 to 128 would pay for 128 everywhere).
  A server batch gathered from concurrent requests has random lengths; it pays for little padding.
  A length-sorted batch with little padding runs as a plain (B, T) grid: there the scatter and
  gather (slow in bf16) would cost more than the padding they save.
- The last layer computes [CLS] only: its attention has one query per text, its feed-forward one row.
- Shapes that the kernels like: a batch's rows are rounded up to one of a few hundred sizes (`round_up`:
  oneDNN reuses the kernel it built for a shape), and an attention grid is widened to the next
  multiple of 16 positions where that adds under 8 (`attention_width`: the CPU flash attention's
  tail for the remainder is slow).
- One query/key/value matmul instead of three; `pack()` lays the weights out for oneDNN once, with
  the bias and the activation inside the matmul (what torch.compile's freezing does, without the
  seconds of compiling).
- Start-up: `potluck predict` needs torch, safetensors and tokenizers only; importing transformers'
  BERT and auto classes costs seconds before the first answer.

It loads the same safetensors weights transformers' BertForSequenceClassification saves and computes
the same function (tests compare both to 2e-5 in fp32). Anything it does not know (another model type,
another activation, relative positions) makes `supports` say no, and the caller runs transformers.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
# the same activations as oneDNN post-ops (attr, algorithm), fused into a packed matmul
ONEDNN_POST_OPS = {"gelu": ("gelu", "none"), "relu": ("relu", ""), "gelu_new": ("gelu", "tanh"),
                   "gelu_pytorch_tanh": ("gelu", "tanh")}


def supports(config: dict) -> bool:
    """Whether `config` (a config.json dict) is a BERT sequence classifier this module computes exactly."""
    return (config.get("model_type") == "bert"
            and "BertForSequenceClassification" in (config.get("architectures") or [])
            and config.get("hidden_act") in ACTIVATIONS
            and config.get("position_embedding_type", "absolute") == "absolute"
            and not config.get("is_decoder", False) and not config.get("add_cross_attention", False)
            and config.get("problem_type") in (None, "single_label_classification")
            and config["hidden_size"] % config["num_attention_heads"] == 0)


class _Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float, act: str):
        super().__init__()
        self.heads, self.act = heads, ACTIVATIONS[act]
        self.post_op = ONEDNN_POST_OPS[act]
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.ff_in = nn.Linear(hidden, intermediate)
        self.ff_out = nn.Linear(intermediate, hidden)
        self.ff_norm = nn.LayerNorm(hidden, eps=eps)
        self.packed: dict[str, torch.Tensor] = {}  # oneDNN-packed weights by Linear name (see FastBert.pack)

    def pack(self, rows: int) -> None:
        for name in ("qkv", "attn_out", "ff_in", "ff_out"):
            self.packed[name] = torch.ops.mkldnn._reorder_linear_weight(getattr(self, name).weight.detach(), rows)

    def dense(self, name: str, x: torch.Tensor, activate: bool = False) -> torch.Tensor:
        """The Linear layer `name` on x (then the activation, if `activate`); one fused oneDNN call when packed."""
        if self.packed:
            attr, algorithm = self.post_op if activate else ("none", "")
            return torch.ops.mkldnn._linear_pointwise(x, self.packed[name], getattr(self, name).bias, attr, [],
                                                      algorithm)
        y = getattr(self, name)(x)
        return self.act(y) if activate else y

    def forward(self, x: torch.Tensor, blocks: list[_Block], first: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, H), the rows of the blocks one after the other. first: (B,) the rows of x holding each
        text's [CLS]; given, only those are computed and returned (B, H): all the classifier reads of
        the last layer."""
        hidden = x.shape[1]
        d = hidden // self.heads
        qkv = self.dense("qkv", x)  # (N, 3H)
        contexts = []
        for block in blocks:
            grid = qkv[block.start:block.stop]  # (tokens, 3H)
            if block.where is not None:  # scatter into the block's (rows, width) grid; padding stays zero
                grid = grid.new_zeros(block.rows * block.width, 3 * hidden).index_copy_(0, block.where, grid)
            elif block.width > block.longest:  # widen each row of the grid to width
                grid = F.pad(grid.view(block.rows, block.longest, 3 * hidden), (0, 0, 0, block.width - block.longest))
            q, k, v = grid.view(block.rows, block.width, 3, self.heads, d).permute(2, 0, 3, 1, 4)  # (b, heads, W, d)
            if first is not None:
                q = q[:, :, :1]  # [CLS] is position 0 of its row
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=block.keep)  # (b, heads, W or 1, d)
            if first is None and block.where is None and block.width > block.longest:
                context = context[:, :, :block.longest]  # (b, heads, T, d)
            context = context.transpose(1, 2).reshape(-1, hidden)  # (b*W, b*T or b, H)
            if block.where is not None and first is None:
                context = context[block.where]  # (tokens, H)
            contexts.append(context)
        context = contexts[0] if len(contexts) == 1 else torch.cat(contexts)  # (tokens or B, H)
        if first is not None:
            x = x[first]
        elif len(context) < len(x):  # x has spare rows past the tokens (see round_up): zeros for them
            context = F.pad(context, (0, 0, 0, len(x) - len(context)))  # (N, H)
        x = self.attn_norm(x + self.dense("attn_out", context))
        return self.ff_norm(x + self.dense("ff_out", self.dense("ff_in", x, activate=True)))


@dataclass
class _Block:
    """Texts of similar length whose attention runs as one (rows, width) grid, width the longest
    length rounded up (see FastBert.attend_step): tokens start:stop of the layer input, scattered to
    flat grid positions `where` (None: they are a (rows, longest) grid already, widened to width).
    keep: (rows, 1, 1, width), True for real tokens (None: no padding)."""

    start: int
    stop: int
    rows: int
    longest: int
    width: int
    where: torch.Tensor | None = None
    keep: torch.Tensor | None = None

    @classmethod
    def of(cls, lengths: np.ndarray, start: int, grid: bool, device, step: int = 1) -> _Block:
        """The block of texts with these lengths whose tokens begin at `start`: packed (one after the
        other, longest first), or, with grid, already padded to the longest (rows in any order)."""
        rows, longest = len(lengths), int(lengths.max())
        width = attention_width(longest, step)
        block = cls(start, start + (rows * longest if grid else int(lengths.sum())), rows, longest, width)
        if lengths.min() < width:
            block.keep = (torch.arange(width) < torch.from_numpy(lengths)[:, None]).view(rows, 1, 1, width)
            block.keep = block.keep.to(device)
            if not grid:
                offsets = np.repeat(np.arange(rows) * width - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
                block.where = torch.from_numpy(np.arange(int(lengths.sum())) + offsets).to(device)
        return block


def attention_width(longest: int, step: int = 16) -> int:
    """The width of an attention grid for rows of at most `longest` tokens: the next multiple of
    `step` where that adds fewer than step / 2 positions, else `longest`. torch's CPU flash attention
    handles a length that is not a multiple of 16 in a slow tail whose cost grows with the remainder;
    measured here (64 rows x 12 heads x 32, bf16, one thread), widening with a key mask ran 60 -> 64
    positions 1.6x, 94 -> 96 1.5x, 126 -> 128 1.3x and 120 -> 128 1.0x as fast, but 100 -> 112 0.9x."""
    if step <= 1 or longest % step <= step // 2:
        return longest
    return longest + step - longest % step


def round_up(rows: int, step: int) -> int:
    """`rows` rounded up to a multiple of 1/`step` of the power of two below it (at most 1/step more
    rows): 100 -> 100, 1000 -> 1024, 1030 -> 1088 for step 16. oneDNN builds a kernel for each matmul
    shape it meets and keeps the last 1024; a server's batches have ever new numbers of tokens, and
    building them cost 25 % of the forward pass here (batches of 10 random texts, fresh shapes against
    repeated ones). Rounded, a few hundred shapes cover every batch up to 16k tokens."""
    if step <= 0 or rows <= step:
        return rows
    grain = 1 << max(0, rows.bit_length() - 1 - step.bit_length() + 1)
    return -(-rows // grain) * grain


def length_blocks(lengths: np.ndarray, slack: float) -> list[tuple[int, int]]:
    """Cut lengths sorted longest first into runs [i, j) whose rows are all >= slack x the run's longest."""
    runs, i = [], 0
    for j in range(1, len(lengths) + 1):
        if j == len(lengths) or lengths[j] < slack * lengths[i]:
            runs.append((i, j))
            i = j
    return runs


class FastBert(nn.Module):
    """BertForSequenceClassification's eval-mode forward on unpadded batches. Logits like transformers'."""

    def __init__(self, config: dict):
        super().__init__()
        if not supports(config):
            raise ValueError("not a BERT sequence classifier this runner supports")
        hidden, eps = config["hidden_size"], config.get("layer_norm_eps", 1e-12)
        id2label = {int(i): label for i, label in config["id2label"].items()}
        self.labels = [id2label[i] for i in range(len(id2label))]  # column order of the logits
        self.num_labels = len(self.labels)
        self.max_positions = config["max_position_embeddings"]
        self.word = nn.Embedding(config["vocab_size"], hidden)
        self.position = nn.Embedding(config["max_position_embeddings"], hidden)
        self.token_type = nn.Embedding(config.get("type_vocab_size", 2), hidden)
        self.embed_norm = nn.LayerNorm(hidden, eps=eps)
        act = config["hidden_act"]
        self.layers = nn.ModuleList(_Layer(hidden, config["num_attention_heads"], config["intermediate_size"], eps, act)
                                    for _ in range(config["num_hidden_layers"]))
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, self.num_labels)
        self.pack_below = 0.9  # pack a batch when real tokens are under this share of its (B, T) grid
        self.block_slack = 0.8  # packed: attention blocks hold texts of >= 80 % of their longest's length
        self.row_step = 16  # rows per matmul rounded up to 1/16 of their power of two (see round_up)
        self.attend_step = 16  # attention grids widened to a multiple of 16 where it pays (attention_width)
        self.eval()

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> FastBert | None:
        """The runner for a model folder (config.json + model.safetensors), or None if unsupported.
        The folder is checked first (potluck.folder): every tensor config.json implies, with its shape,
        finite, and a label per row of the head; a UserError names what is wrong."""
        from potluck.errors import UserError
        from potluck.folder import RESAVE, check_labels, check_tensors, load_tensors, read_config

        folder = Path(folder)
        config = read_config(folder)
        try:
            if not supports(config):
                return None
            expected = expected_tensors(config)
        except KeyError as err:
            raise UserError(f"{folder / 'config.json'}: field {err} is missing", hint=RESAVE) from None
        except (TypeError, ValueError, AttributeError, ZeroDivisionError) as err:
            raise UserError(f"{folder / 'config.json'}: a field is malformed ({err})", hint=RESAVE) from None
        tensors = load_tensors(folder)
        if "classifier.weight" in tensors:
            check_labels(folder, config, tensors["classifier.weight"].shape[0])
        check_tensors(folder, tensors, expected, optional=OPTIONAL_TENSORS)
        return cls.from_state_dict(config, tensors)

    @classmethod
    def from_model(cls, model) -> FastBert | None:
        """The runner for a loaded transformers model (its weights copied), or None if unsupported."""
        config = {**model.config.to_dict(), "architectures": [type(model).__name__]}
        if not supports(config):
            return None
        return cls.from_state_dict(config, {k: v.detach() for k, v in model.state_dict().items()})

    @classmethod
    def from_state_dict(cls, config: dict, tensors: dict[str, torch.Tensor]) -> FastBert | None:
        """Copy transformers' tensors into this module (shapes checked). None when a tensor it needs is
        missing: transformers then loads the model and says what it does about it."""
        with _no_random_init():  # every weight is loaded just below
            runner = cls(config)
        try:
            state = _renamed(tensors, len(runner.layers))
        except KeyError:
            return None
        runner.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)  # shapes checked here
        return runner

    def pack(self, rows: int = 4096) -> FastBert:
        """Pre-pack the Linear weights of the layers for oneDNN, as torch.compile's freezing does: the
        weights are laid out for the CPU's matmul once instead of on every call, and the bias and the
        activation run inside the matmul. `rows`: the typical rows per call, a hint. Call it last
        (after `.to(dtype)`): a packed runner stays on the CPU in that dtype. Returns self; unchanged
        where torch has no oneDNN or oneDNN cannot pack this dtype on this CPU (said once)."""
        if torch.backends.mkldnn.is_available() and self.word.weight.device.type == "cpu":
            try:
                for layer in self.layers:
                    layer.pack(rows)
            except RuntimeError as error:  # e.g. bf16 on a CPU without AVX512BW/VL/DQ or AVX-NE-CONVERT
                from potluck.hardware import say_once

                for layer in self.layers:
                    layer.packed = {}
                say_once(f"weights not packed for oneDNN, plain matmuls run instead: {str(error).splitlines()[0]}")
        return self

    # -- running ------------------------------------------------------------------------------

    @torch.inference_mode()
    def classify(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits (N, C) float32 for token-id rows (each [CLS] ... [SEP]), in their order, in one pass."""
        if len(rows) == 0:
            return torch.zeros(0, self.num_labels)
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        batch, longest, total = len(rows), int(lengths.max()), int(lengths.sum())
        if longest > self.max_positions:
            raise ValueError(f"a row has {longest} tokens, more than the model's {self.max_positions} positions")
        device = self.word.weight.device
        if total >= self.pack_below * batch * longest:  # little padding: run the (B, T) grid, as transformers does
            order = np.arange(batch)
            ids = np.zeros((batch, longest), dtype=np.int64)
            for i, r in enumerate(rows):
                ids[i, :len(r)] = r
            ids, positions = ids.reshape(-1), np.tile(np.arange(longest), batch)  # (B*T,)
            starts = np.arange(batch) * longest
            blocks = [_Block.of(lengths, 0, grid=True, device=device, step=self.attend_step)]
        else:  # packed, longest first; attention per block of similar lengths
            order = np.argsort(-lengths, kind="stable")
            lengths = lengths[order]
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # (B,) where each row begins
            ids = np.fromiter((t for i in order for t in rows[i]), dtype=np.int64, count=total)  # (N,)
            positions = np.arange(total) - np.repeat(starts, lengths)  # (N,)
            blocks = [_Block.of(lengths[i:j], int(starts[i]), grid=False, device=device, step=self.attend_step)
                      for i, j in length_blocks(lengths, self.block_slack)]
        rows_run = round_up(len(ids), self.row_step)
        if rows_run > len(ids):  # spare rows at the end: no block reads them, no text sees them
            ids = np.concatenate([ids, np.zeros(rows_run - len(ids), dtype=np.int64)])
            positions = np.concatenate([positions, np.zeros(rows_run - len(positions), dtype=np.int64)])
        ids, positions = torch.from_numpy(ids).to(device), torch.from_numpy(positions).to(device)
        x = self.embed_norm(self.word(ids) + self.position(positions) + self.token_type.weight[0])  # (N, H)
        first = torch.from_numpy(starts).to(device)  # (B,) each row's [CLS]
        for i, layer in enumerate(self.layers):
            x = layer(x, blocks, first if i == len(self.layers) - 1 else None)
        logits = self.classifier(torch.tanh(self.pooler(x))).float()  # (B, C), rows in `order`
        return logits[torch.from_numpy(np.argsort(order)).to(device)]


_building = threading.local()


@contextmanager
def _no_random_init():
    """Build modules in this thread without drawing random initial weights (as transformers'
    no_init_weights does): nn.Linear and nn.Embedding fill theirs at construction, 0.2 s for MiniLM, a
    tenth of the cold start of `potluck predict`, for weights that are overwritten at once. Another
    thread building modules meanwhile still gets its random init. (Building on torch's meta device
    instead cost 1.6 s on its first use.)"""
    names = ("kaiming_uniform_", "uniform_", "normal_")
    saved = {name: getattr(nn.init, name) for name in names}

    def skipping(original):
        def init(tensor, *args, **kwargs):
            return tensor if getattr(_building, "active", False) else original(tensor, *args, **kwargs)
        return init

    for name in names:
        setattr(nn.init, name, skipping(saved[name]))
    _building.active = True
    try:
        yield
    finally:
        _building.active = False
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


OPTIONAL_TENSORS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")  # buffers some savers keep


def expected_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """The tensors (transformers' names) and shapes of the BertForSequenceClassification `config` describes."""
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    b = "bert."
    shapes = {b + "embeddings.word_embeddings.weight": (config["vocab_size"], hidden),
              b + "embeddings.position_embeddings.weight": (config["max_position_embeddings"], hidden),
              b + "embeddings.token_type_embeddings.weight": (config.get("type_vocab_size", 2), hidden),
              b + "embeddings.LayerNorm.weight": (hidden,), b + "embeddings.LayerNorm.bias": (hidden,),
              b + "pooler.dense.weight": (hidden, hidden), b + "pooler.dense.bias": (hidden,),
              "classifier.weight": (len(config["id2label"]), hidden), "classifier.bias": (len(config["id2label"]),)}
    for i in range(config["num_hidden_layers"]):
        p = f"{b}encoder.layer.{i}."
        for name, rows, cols in (("attention.self.query", hidden, hidden), ("attention.self.key", hidden, hidden),
                                 ("attention.self.value", hidden, hidden), ("attention.output.dense", hidden, hidden),
                                 ("intermediate.dense", inner, hidden), ("output.dense", hidden, inner)):
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (rows, cols), (rows,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + norm + ".weight"], shapes[p + norm + ".bias"] = (hidden,), (hidden,)
    return shapes


def _renamed(tensors: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """transformers' BertForSequenceClassification tensors under FastBert's names (query, key and value
    stacked into one qkv); KeyError for a missing one."""
    b = "bert."
    mapping = {"word.weight": b + "embeddings.word_embeddings.weight",
               "position.weight": b + "embeddings.position_embeddings.weight",
               "token_type.weight": b + "embeddings.token_type_embeddings.weight",
               "embed_norm.weight": b + "embeddings.LayerNorm.weight", "embed_norm.bias": b + "embeddings.LayerNorm.bias",
               "pooler.weight": b + "pooler.dense.weight", "pooler.bias": b + "pooler.dense.bias",
               "classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"}
    state = {ours: tensors[theirs] for ours, theirs in mapping.items()}
    for i in range(layers):
        p = f"{b}encoder.layer.{i}."
        for part in ("weight", "bias"):
            state[f"layers.{i}.qkv.{part}"] = torch.cat([tensors[f"{p}attention.self.{name}.{part}"]
                                                         for name in ("query", "key", "value")])
            for ours, theirs in (("attn_out", "attention.output.dense"), ("attn_norm", "attention.output.LayerNorm"),
                                 ("ff_in", "intermediate.dense"), ("ff_out", "output.dense"),
                                 ("ff_norm", "output.LayerNorm")):
                state[f"layers.{i}.{ours}.{part}"] = tensors[p + theirs + "." + part]
    return state


class FastTokenizer:
    """The folder's tokenizer.json through the `tokenizers` library: the ids transformers' fast
    tokenizer gives with truncation=True, max_length=max_length (tests compare them)."""

    def __init__(self, path: Path, max_length: int, pad_token: str = "[PAD]"):
        from tokenizers import Tokenizer

        self.max_length = max_length
        # two backends, each with fixed settings, so that threads can share this object
        text = Path(path).read_text(encoding="utf-8")
        self.truncating, self.whole = Tokenizer.from_str(text), Tokenizer.from_str(text)
        for backend in (self.truncating, self.whole):
            backend.no_padding()
            backend.no_truncation()
        self.truncating.enable_truncation(max_length)
        self.pad_token_id = self.whole.token_to_id(pad_token)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, max_length: int) -> FastTokenizer | None:
        """None where the folder has no tokenizer.json (transformers then builds one)."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            return None
        settings = folder / "tokenizer_config.json"
        pad = json.loads(settings.read_text()).get("pad_token") if settings.is_file() else None
        pad = (pad.get("content") if isinstance(pad, dict) else pad) or "[PAD]"
        tokenizer = cls(folder / "tokenizer.json", max_length, pad)
        return tokenizer if tokenizer.pad_token_id is not None else None

    def encode(self, texts: Sequence[str], truncate: bool = True) -> list[list[int]]:
        """Token ids per text ([CLS] ... [SEP]), cut to max_length unless truncate is False."""
        backend = self.truncating if truncate else self.whole
        # encode_batch_fast skips the character offsets, which we never read (~15 % faster here)
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in encode(list(texts))]

