"""The benchmark tasks (`TASKS`) and the recipe of each one's ground-truth sweep (`TaskSpec`):
model, split sizes, training steps, learning-rate grid, seeds and ranks, and an estimate of
what the sweep costs on 2 CPU cores.

Each recipe's comments give the measurements its learning-rate grid rests on. A task is one
`TaskSpec` here whose builder comes from a sibling module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from lorank.bench.tasks.acronyms import build_facts
from lorank.bench.tasks.man_pages import build_man_names
from lorank.bench.tasks.source_text import Builder
from lorank.bench.tasks.stdlib_code import build_code_docstring
from lorank.bench.tasks.wordnet import build_format_json, build_wordnet_chat, build_wordnet_lexname

# Speeds on 2 idle CPU cores (float32, one training step with LoRA, all linear layers), used
# only for the sweep-time estimates. Measured here with `train_lora` (2026-11-24): MiniLM-L6
# 0.58 s per step of 32 examples (~0.6 s per 1,024 padded tokens); SmolLM2-135M ~5 s per step
# of 16 short facts (~12 s per 1,024 padded tokens, twice the 6.5 s quoted for long sequences:
# short batches pay fixed per-layer overheads). Another process on the same cores makes torch
# several times slower than this.
SECONDS_PER_1K_TRAIN_TOKENS = {"smollm2-135m": 12.0, "minilm-l6": 0.6}
EVAL_COST_FRACTION = 1 / 3  # a forward pass without gradients costs about a third of a step
PADDING_FACTOR = 1.25  # batches are padded to their longest example


@dataclass(frozen=True)
class TaskSpec:
    """A benchmark task and the recipe of its ground-truth sweep.

    `mean_tokens` is the mean length of one example (prompt + completion, or text) measured with
    the model's tokenizer on the seed-0 build; it only feeds `sweep_hours`, the estimate of the
    full sweep (ranks x lrs x seeds runs of `steps` steps, each with `n_evals` evaluations).
    """

    name: str
    description: str
    model: str
    format: str  # "prompt-completion" | "classification"
    builder: Builder = field(repr=False, compare=False)
    sources: tuple[str, ...]  # Debian packages read, or "python-stdlib"
    n_train: int
    n_val: int
    max_length: int
    batch_size: int
    steps: int
    lrs: tuple[float, ...]
    mean_tokens: float
    expected_rank: str
    targets: str = "all-linear"
    seeds: tuple[int, ...] = (0, 1)
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    scaling: str = "rslora"
    lora_alpha: float = 8.0  # = lorank.train.DEFAULT_ALPHA: fixed alpha, rsLoRA scale alpha/sqrt(r)
    n_evals: int = 1
    skip_margin: float | None = None  # sweep: a later seed skips an lr dominated at seed 0
    notes: str = ""

    @property
    def n_runs(self) -> int:
        return len(self.ranks) * len(self.lrs) * len(self.seeds)

    def run_seconds(self) -> float:
        """Estimated wall time of one run: training steps plus its evaluations."""
        per_token = SECONDS_PER_1K_TRAIN_TOKENS[self.model] / 1024 * PADDING_FACTOR
        train = self.steps * self.batch_size * self.mean_tokens * per_token
        evals = self.n_evals * self.n_val * self.mean_tokens * per_token * EVAL_COST_FRACTION
        return train + evals

    def sweep_hours(self) -> float:
        return self.n_runs * self.run_seconds() / 3600

    def epochs(self) -> float:
        return self.steps * self.batch_size / self.n_train

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("builder")
        d.update(
            n_runs=self.n_runs,
            est_run_seconds=round(self.run_seconds(), 1),
            est_sweep_hours=round(self.sweep_hours(), 2),
            epochs=round(self.epochs(), 2),
        )
        return d


# 5e-4 lost to 2e-3 at every rank of format-json's first sweep (and at r=1 on man-names): the
# SmolLM2 grid starts at 2e-3 and goes up; format-json keeps its 5e-4 runs and adds 8e-3.
_SMOL_LRS = (2e-3, 8e-3)


def _facts_spec(n: int, epochs: int = 3) -> TaskSpec:
    # Three passes over the facts at every size: memorizing needs repetitions, and the sizes
    # must differ in how much there is to store, not in how often each fact was seen. The same
    # facts at another number of passes (`epochs`) is the ladder's recipe axis: one dataset,
    # two planned runs, so the effect of the run's length on r* is measured, not assumed.
    batch = 16
    suffix = "" if epochs == 3 else f"-{epochs}ep"
    return TaskSpec(
        name=f"facts-{n}{suffix}",
        description=f"{n} acronym expansions (V.E.R.A.), trained as 'Acronym: X / Expansion:', "
        f"validated on {min(n, 300)} of the same facts as 'What does X stand for?'",
        model="smollm2-135m",
        format="prompt-completion",
        builder=build_facts,
        sources=("dict-vera",),
        n_train=n,
        n_val=min(n, 300),
        max_length=64,
        batch_size=batch,
        steps=-(-epochs * n // batch),
        # 8e-3 beat 2e-3 by 2 nats at ranks 1-8 of facts-100's first runs, so facts-100 added
        # 3.2e-2 to bracket it; 3.2e-2 then lost or diverged at every rank (by 9+ nats at r=8,
        # NaN at r >= 16). The larger sizes take 3x and 10x the steps at the same lr, which
        # only makes 3.2e-2 less stable: they sweep 2e-3 and 8e-3 (a third less compute).
        # facts-300's first 16 runs: 8e-3 beat 2e-3 by 0.9-1.8 nats at ranks 1-8, the grid's
        # top edge, so it adds 1.6e-2 to bracket (half of facts-100's unstable 3.2e-2).
        # 1.6e-2 then lost at every rank (by 0.8 nats at r=1, 6+ nats from r=8), and 8e-3
        # diverged on one seed of two at r >= 16 while 2e-3 underfits there, so facts-300
        # adds 4e-3 between them, which won from r=16 up. facts-1000 takes 3.3x
        # the steps, which moves the best lr down if anything: 2e-3, 4e-3 and 8e-3.
        lrs=(*_SMOL_LRS, 3.2e-2) if n <= 100 else (2e-3, 4e-3, 8e-3, 1.6e-2) if n <= 300
        else (2e-3, 4e-3, 8e-3),
        # facts-1000's 42 runs take ~15 min each here, so its second seed skips an lr that lost
        # at seed 0 by more than 1 nat (lorank.sweep.dominated_reason). Replayed on the five
        # tasks swept in full with two seeds (benchmarks/skip_margin_replay.py), that margin
        # skips 31 of 112 second-seed runs and changes no rank's best lr; 0.5 skips 42 and
        # changes one (facts-100 r=32: 8e-3 led seed 0 by 0.94 nats, then diverged on seed 1).
        skip_margin=1.0 if n >= 1000 else None,
        mean_tokens=16.3,
        n_evals=2,
        expected_rank="grows with size (memorization)",
        notes=f"{epochs} pass{'es' if epochs != 1 else ''} over the facts (the ladder facts-100/300/"
        "1000 takes 3 at every size); facts-1000 takes far more than an hour on 2 CPU cores "
        "(see est_sweep_hours): run it over several sittings (the sweep resumes) or on a GPU.",
    )


TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        TaskSpec(
            name="format-json",
            description="WordNet entry in plain words -> the same content as a JSON record",
            model="smollm2-135m",
            format="prompt-completion",
            builder=build_format_json,
            sources=("wordnet-base",),
            n_train=208,
            n_val=128,
            max_length=128,
            batch_size=8,
            steps=26,
            lrs=(5e-4, 2e-3, 8e-3),
            mean_tokens=67.0,
            expected_rank="low (format only; content is in the prompt)",
        ),
        # 100 / 300 / 1,000 rather than 300 / 1,500 / 6,000: on 2 CPU cores
        # those sweep in 2, 9 and 34 hours; these in about 1, 2 and 7 (a 10x range still)
        _facts_spec(100),
        _facts_spec(300),
        _facts_spec(1000),
        _facts_spec(300, epochs=1),
        TaskSpec(
            name="code-docstring",
            description="short Python stdlib function (code without docstring) -> first line "
            "of its docstring",
            model="smollm2-135m",
            format="prompt-completion",
            builder=build_code_docstring,
            sources=("python-stdlib",),
            n_train=280,
            n_val=160,
            max_length=128,
            batch_size=8,
            steps=35,
            # 2e-3 beat 8e-3 at every rank of the first 28 runs (by 0.01-0.9 nats, 8e-3 rising
            # with rank): 5e-4 brackets it from below
            lrs=(5e-4, *_SMOL_LRS),
            mean_tokens=48.0,
            expected_rank="moderate (code to summary; held-out functions)",
        ),
        TaskSpec(
            name="man-names",
            description="C function / system call name(s) -> one-line NAME description "
            "of its Linux man page (held-out pages)",
            model="smollm2-135m",
            format="prompt-completion",
            builder=build_man_names,
            sources=("manpages-dev",),
            n_train=600,
            n_val=200,
            max_length=64,
            batch_size=16,
            steps=45,
            lrs=_SMOL_LRS,
            mean_tokens=20.0,
            expected_rank="low (generalization to unseen pages)",
        ),
        TaskSpec(
            name="wordnet-chat",
            description="chat: a system turn sets a thesaurus reply style; the user names a "
            "word and its meaning, the assistant lists the synset's other words (held-out "
            "synsets)",
            model="smollm2-135m",
            format="chat",
            builder=build_wordnet_chat,
            sources=("wordnet-base",),
            n_train=400,
            n_val=150,
            max_length=128,
            batch_size=8,
            steps=50,  # one pass
            lrs=(5e-4, *_SMOL_LRS),
            mean_tokens=70.0,
            expected_rank="low to moderate (reply style plus recalled synonyms)",
            notes="not swept yet: defined so that a sweep can start (`lorank sweep --task "
            "wordnet-chat --out benchmarks/results/wordnet-chat`)",
        ),
        TaskSpec(
            name="wordnet-lexname",
            description="WordNet definition -> lexicographer file (supersense), "
            "10 balanced classes",
            model="minilm-l6",
            format="classification",
            builder=build_wordnet_lexname,
            sources=("wordnet-base",),
            n_train=2500,
            n_val=500,
            max_length=64,
            batch_size=32,
            steps=150,
            lrs=(1e-3, 4e-3, 1.6e-2),  # 4e-3 won at every rank in the first sweep: 1.6e-2 brackets it
            mean_tokens=16.0,
            n_evals=4,
            expected_rank="moderate; noisy (seed spread as large as rank effects)",
        ),
    )
}
