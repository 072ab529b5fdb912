"""Settings of a fusion round (`potluck commons round`), kept free of heavy imports for the CLI.

    potluck commons round URL --method median --min-contributions 3 --margin 0.02

The fusion parameters are passed to `potluck.fusion.FusionSettings` and the gate's to
`potluck.commons.gate.GateSettings`, which check them (a bad value is a 400 with one line saying why).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RoundSettings:
    """How one round fuses contributions and how the gate judges the candidate."""

    method: str = field(default="mean", metadata={"help": "fusion: 'mean', 'trimmed-mean', 'median' or 'ties'"})
    weights: str = field(default="equal", metadata={
        "help": "mean only: 'equal', or 'examples' (each contribution weighted by its example count)"})
    trim: float = field(default=0.2, metadata={"help": "trimmed-mean: share dropped at each end per coordinate"})
    density: float = field(default=0.2, metadata={"help": "ties: share of each task vector kept"})
    min_contributions: int = field(default=3, metadata={
        "help": "fewest unfused weights contributions on the current base a round needs"})
    margin: float = field(default=0.02, metadata={
        "help": "gate: largest drop in one task's macro-F1 a promotion may cause"})
    full_finetune_epochs: int = field(default=0, metadata={
        "help": "gate: 0 = logistic regression on the frozen encoder; > 0 = fine-tune each task this many epochs"})
    max_examples: int = field(default=2000, metadata={
        "help": "gate and head refit: at most this many training examples per task (a stratified sample)"})
    seed: int = field(default=0, metadata={"help": "seed of the gate's regressions and samples"})

    def __post_init__(self):
        from potluck.errors import require

        require((self.min_contributions >= 1, f"min_contributions must be at least 1, got {self.min_contributions}"),
                (self.max_examples >= 16, f"max_examples must be at least 16, got {self.max_examples}"))

    def to_dict(self) -> dict:
        return asdict(self)
