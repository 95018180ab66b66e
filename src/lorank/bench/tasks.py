"""Benchmark tasks: builders that turn real text on this machine into train/validation sets.

Every task comes from text that is either installed offline from a Debian package (WordNet,
V.E.R.A. acronyms, the Linux man-pages) or is the Python standard library's own source, so the
benchmark never downloads anything. Builders are deterministic from a seed: the same seed on the
same machine (same package versions, same Python) gives byte-identical files; task.json records
those versions so a result can say exactly what it was measured on.

Each task has a recipe (`TaskSpec`): model alias, training steps, learning-rate grid, seeds and
ranks of the ground-truth sweep, and an estimate of what that sweep costs on 2 CPU cores.

Formats written (JSONL, one object per line):
  generation:      {"prompt": str, "completion": str}
  classification:  {"text": str, "label": str}
"""

from __future__ import annotations

import ast
import copy
import functools
import gzip
import json
import platform
import random
import re
import subprocess
import sysconfig
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorank.errors import LorankError
from lorank.util import atomic_write_text

INSTALL_HINT = "bash scripts/install-task-data.sh"

# Where the Debian packages put their data (module-level so tests can point them elsewhere).
WORDNET_DIR = Path("/usr/share/wordnet")
VERA_DIR = Path("/usr/share/dictd")
MAN_DIR = Path("/usr/share/man")

# Speeds on 2 idle CPU cores (float32, one training step with LoRA, all linear layers), used
# only for the sweep-time estimates. Measured here with `train_lora` (2026-11-24): MiniLM-L6
# 0.58 s per step of 32 examples (~0.6 s per 1,024 padded tokens); SmolLM2-135M ~5 s per step
# of 16 short facts (~12 s per 1,024 padded tokens, twice the 6.5 s quoted for long sequences:
# short batches pay fixed per-layer overheads). Another process on the same cores makes torch
# several times slower than this.
SECONDS_PER_1K_TRAIN_TOKENS = {"smollm2-135m": 12.0, "minilm-l6": 0.6}
EVAL_COST_FRACTION = 1 / 3  # a forward pass without gradients costs about a third of a step
PADDING_FACTOR = 1.25  # batches are padded to their longest example

Rows = list[dict[str, str]]
Builder = Callable[[int, int, int], tuple[Rows, Rows, dict]]


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


# --------------------------------------------------------------------------- helpers


def _require(path: Path, package: str) -> None:
    if not path.exists():
        raise ValueError(
            f"missing {path}: the Debian package '{package}' is not installed; "
            f"install it with: {INSTALL_HINT}"
        )


def package_version(package: str) -> str | None:
    """Installed version of a Debian package, or None when dpkg does not know it."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _words(s: str) -> int:
    return len(s.split())


def _clean(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


# --------------------------------------------------------------------------- WordNet

# lexicographer file numbers -> names, from lexnames(5WN); fixed since WordNet 3.0.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()

POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


@dataclass(frozen=True)
class Synset:
    offset: str
    pos: str  # n v a s r
    lexname: str
    lemmas: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.offset}-{self.pos}"


def read_wordnet() -> list[Synset]:
    """All synsets of the WordNet 3.0 database files, in file order (nouns, verbs, adj, adv)."""
    return list(_read_wordnet(WORDNET_DIR))


@functools.lru_cache(maxsize=2)
def _read_wordnet(wordnet_dir: Path) -> tuple[Synset, ...]:
    synsets = []
    for part in ("noun", "verb", "adj", "adv"):
        path = wordnet_dir / f"data.{part}"
        _require(path, "wordnet-base")
        with open(path, encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):  # licence header
                    continue
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                n_words = int(fields[3], 16)
                lemmas = []
                for i in range(n_words):
                    w = fields[4 + 2 * i]
                    w = re.sub(r"\((a|p|ip)\)$", "", w)  # adjective position markers
                    lemmas.append(w.replace("_", " "))
                examples = tuple(_clean(e) for e in re.findall(r'"([^"]+)"', gloss))
                definition = _clean(gloss.split('"', 1)[0]).rstrip(";: ").strip()
                synsets.append(
                    Synset(
                        offset=fields[0],
                        pos=fields[2],
                        lexname=LEXNAMES[int(fields[1])],
                        lemmas=tuple(dict.fromkeys(lemmas)),
                        definition=definition,
                        examples=examples,
                    )
                )
    return tuple(synsets)


def _format_json_row(s: Synset) -> dict[str, str]:
    word, synonyms = s.lemmas[0], list(s.lemmas[1:])
    example = s.examples[0] if s.examples else None
    prompt = (
        f"{word} ({POS_NAMES[s.pos]}): {s.definition}. "
        f"Also: {', '.join(synonyms) if synonyms else 'none'}. "
        f"E.g. {example or 'none'}.\nJSON:"
    )
    record = {
        "word": word,
        "pos": s.pos,
        "def": s.definition,
        "syn": synonyms,
        "ex": example,
    }
    return {"prompt": prompt, "completion": " " + json.dumps(record, ensure_ascii=False)}


FORMAT_MAX_CHARS = 260


def build_format_json(n_train: int, n_val: int, seed: int) -> tuple[Rows, Rows, dict]:
    """WordNet entry in plain words -> the same content as a fixed JSON record.

    Everything the completion says is in the prompt, so only the output format is learned:
    the low-rank end of the benchmark.
    """
    pool = [
        s
        for s in read_wordnet()
        if 3 <= _words(s.definition) <= 9
        and len(s.lemmas) <= 3
        and all(_words(w) <= 2 for w in s.lemmas)
        and all(_words(e) <= 8 for e in s.examples[:1])
        and s.definition.isascii()
        and all(x.isascii() for x in s.lemmas + s.examples[:1])
    ]
    random.Random(f"format-json:{seed}").shuffle(pool)
    rows = []
    for s in pool:  # render in shuffled order until there are enough short ones
        row = _format_json_row(s)
        # ~4 characters per token: keeps prompt + completion under about 96 tokens
        if len(row["prompt"]) + len(row["completion"]) <= FORMAT_MAX_CHARS:
            rows.append(row)
            if len(rows) == n_val + n_train:
                break
    val, train = rows[:n_val], rows[n_val:]
    meta = {"split": "disjoint by synset", "pool": len(pool)}
    return train, val, meta


CHAT_SYSTEM = ("You are a thesaurus. Reply with the other words for the meaning the user gives, "
               "as a comma-separated list, and nothing else.")


def build_wordnet_chat(n_train: int, n_val: int, seed: int) -> tuple[Rows, Rows, dict]:
    """Chat instruction following: a system turn sets a reply style, the user names a word and
    its meaning, the assistant lists that synset's other words (loss on the assistant turn
    only, rendered with the model's own chat template).

    The style is learned from the system turn and a few examples; the synonyms are WordNet's,
    recalled for held-out synsets: format plus knowledge, between format-json and the facts.
    """
    pool = [
        s for s in read_wordnet()
        if 3 <= len(s.lemmas) <= 5 and 3 <= _words(s.definition) <= 12
        and all(_words(w) <= 2 and w.isascii() for w in s.lemmas) and s.definition.isascii()
    ]
    random.Random(f"wordnet-chat:{seed}").shuffle(pool)
    seen: set[str] = set()
    unique = []
    for s in pool:  # one synset per headword, so no question repeats across the splits
        if s.lemmas[0] not in seen:
            seen.add(s.lemmas[0])
            unique.append(s)
    val, train = unique[:n_val], unique[n_val:n_val + n_train]

    def row(s: Synset) -> dict:
        return {"messages": [
            {"role": "system", "content": CHAT_SYSTEM},
            {"role": "user", "content": f"{s.lemmas[0]} ({POS_NAMES[s.pos]}): {s.definition}"},
            {"role": "assistant", "content": ", ".join(s.lemmas[1:])},
        ]}

    meta = {"split": "disjoint by synset and headword", "pool": len(unique)}
    return [row(s) for s in train], [row(s) for s in val], meta


LEXNAME_CLASSES = (
    "noun.animal",
    "noun.artifact",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.food",
    "noun.location",
    "noun.person",
    "noun.plant",
    "verb.motion",
)


def build_wordnet_lexname(n_train: int, n_val: int, seed: int) -> tuple[Rows, Rows, dict]:
    """WordNet definition -> its lexicographer file (supersense), 10 balanced classes.

    One example per synset, and a definition that occurs under two classes is dropped, so the
    split is disjoint by synset and by text. Classes pair easy (animal, plant) with confusable
    ones (cognition vs communication) so the head alone does not solve it.
    """
    by_class: dict[str, list[Synset]] = {c: [] for c in LEXNAME_CLASSES}
    label_of: dict[str, set[str]] = {}
    synsets = [s for s in read_wordnet() if 4 <= _words(s.definition) <= 30]
    for s in synsets:
        label_of.setdefault(s.definition, set()).add(s.lexname)
    seen: set[str] = set()
    for s in synsets:
        if s.lexname in by_class and len(label_of[s.definition]) == 1 and s.definition not in seen:
            seen.add(s.definition)
            by_class[s.lexname].append(s)
    k_train, k_val = n_train // len(LEXNAME_CLASSES), n_val // len(LEXNAME_CLASSES)
    rng = random.Random(f"wordnet-lexname:{seed}")
    train: list[dict[str, str]] = []
    val: list[dict[str, str]] = []
    for label in LEXNAME_CLASSES:
        pool = by_class[label]
        rng.shuffle(pool)
        if len(pool) < k_train + k_val:
            raise ValueError(f"class {label} has only {len(pool)} synsets")
        val += [{"text": s.definition, "label": label} for s in pool[:k_val]]
        train += [{"text": s.definition, "label": label} for s in pool[k_val : k_val + k_train]]
    rng.shuffle(train)
    rng.shuffle(val)
    meta = {
        "split": "disjoint by synset and by text",
        "labels": list(LEXNAME_CLASSES),
        "class_pool": {c: len(v) for c, v in by_class.items()},
    }
    return train, val, meta


# --------------------------------------------------------------------------- acronym facts

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

FACT_TRAIN_TEMPLATE = "Acronym: {acronym}\nExpansion:"
FACT_VAL_TEMPLATE = "What does {acronym} stand for?\nAnswer:"


def _b64(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


def read_acronyms() -> list[tuple[str, str]]:
    """(acronym, expansion) pairs from V.E.R.A., only acronyms with a single expansion.

    The dictd index gives each entry's byte range; the topic tags in parentheses and the
    alternative spelling in quotes are metadata, not part of the expansion, and are stripped
    (the quoted spelling, e.g. "OS/360", replaces the bare headword "OS360").
    """
    return list(_read_acronyms(VERA_DIR))


@functools.lru_cache(maxsize=2)
def _read_acronyms(vera_dir: Path) -> tuple[tuple[str, str], ...]:
    index, data = vera_dir / "vera.index", vera_dir / "vera.dict.dz"
    _require(index, "dict-vera")
    _require(data, "dict-vera")
    raw = gzip.decompress(data.read_bytes())
    entries: dict[str, list[str]] = {}
    for line in index.read_text(encoding="utf-8").splitlines():
        head, off, length = line.split("\t")
        if head.startswith("00database"):
            continue
        start = _b64(off)
        entries.setdefault(head, []).append(
            raw[start : start + _b64(length)].decode("utf-8", "replace")
        )
    facts = []
    for head in sorted(entries):
        if len(entries[head]) != 1:
            continue
        lines = entries[head][0].strip().split("\n")
        acronym, body = lines[0].strip(), _clean(" ".join(lines[1:]))
        alt = re.search(r', "([^"]+)"$', body)
        if alt:
            body = body[: alt.start()]
            acronym = alt.group(1)
        body = re.sub(r"\s*\([^()]*\)$", "", body)  # trailing topic tags
        body = re.sub(r"\s*\[=[^\]]*\]", "", body)  # "[= Triple A]" cross-references
        body = _clean(body.replace("[", "").replace("]", ""))
        if not (body.isascii() and acronym.isascii()) or not 2 <= _words(body) <= 10:
            continue
        if len(acronym) > 12 or "(" in body or '"' in body:
            continue
        facts.append((acronym, body))
    return tuple(facts)


def acronym_facts(n: int, seed: int) -> list[tuple[str, str]]:
    """The first n facts of one seeded order, so sizes are nested for the same seed."""
    facts = read_acronyms()
    if n > len(facts):
        raise ValueError(f"asked for {n} acronym facts, only {len(facts)} are available")
    random.Random(f"acronym-facts:{seed}").shuffle(facts)
    return facts[:n]


def _fact_row(template: str, acronym: str, expansion: str) -> dict[str, str]:
    return {"prompt": template.format(acronym=acronym), "completion": " " + expansion}


def build_facts(n_train: int, n_val: int, seed: int) -> tuple[Rows, Rows, dict]:
    """Acronym -> expansion, trained with one template and validated with another.

    Validation asks the first n_val trained facts in the other template: on held-out facts the
    loss would measure only what generalizes, and rank barely moves it (DESIGN.md).
    """
    facts = acronym_facts(n_train, seed)
    train = [_fact_row(FACT_TRAIN_TEMPLATE, a, e) for a, e in facts]
    val = [_fact_row(FACT_VAL_TEMPLATE, a, e) for a, e in facts[:n_val]]
    meta = {
        "split": "validation = trained facts asked with another template",
        "train_template": FACT_TRAIN_TEMPLATE,
        "val_template": FACT_VAL_TEMPLATE,
        "pool": len(read_acronyms()),
    }
    return train, val, meta


# --------------------------------------------------------------------------- man pages


def read_man_names() -> list[tuple[str, str, str]]:
    """(names, section, description) from the NAME section of the Linux man-pages (2 and 3).

    Only pages whose .TH line says "Linux man-pages" count, so pages other packages drop into
    man3 do not make the task depend on what else is installed; symlinked aliases are skipped.
    """
    return list(_read_man_names(MAN_DIR))


@functools.lru_cache(maxsize=2)
def _read_man_names(man_dir: Path) -> tuple[tuple[str, str, str], ...]:
    _require(man_dir / "man3" / "strlen.3.gz", "manpages-dev")
    out = []
    for section in ("2", "3"):
        for path in sorted((man_dir / f"man{section}").glob(f"*.{section}.gz")):
            if path.is_symlink():
                continue
            text = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
            th = re.search(r"^\.TH .*$", text, re.M)
            name = re.search(r"^\.SH NAME\n(.*?)^\.SH", text, re.M | re.S)
            if not th or "Linux man-pages" not in th.group(0) or not name:
                continue
            line = _clean(re.sub(r"^\..*$", "", name.group(1), flags=re.M))
            names, sep, desc = line.partition(" \\- ")
            if not sep:
                continue
            names_list = [n.strip() for n in names.split(",") if n.strip()]
            desc = desc.replace("\\-", "-").replace("\\(aq", "'").replace("\\", "")
            out.append((", ".join(names_list[:4]), section, _clean(desc)))
    return tuple(out)


def build_man_names(n_train: int, n_val: int, seed: int) -> tuple[Rows, Rows, dict]:
    """C function / system call name(s) -> the one-line description of its man page.

    Validation pages are held out, so this measures how far a little naming knowledge
    generalizes to unseen functions: a task where rank is expected to matter little.
    """
    pool = [p for p in read_man_names() if 2 <= _words(p[2]) <= 14 and p[2].isascii()]
    seen: set[str] = set()
    unique = []
    for p in pool:  # one page per description, so no answer is in both splits
        if p[2] not in seen:
            seen.add(p[2])
            unique.append(p)
    random.Random(f"man-names:{seed}").shuffle(unique)
    val, train = unique[:n_val], unique[n_val : n_val + n_train]

    def row(p: tuple[str, str, str]) -> dict[str, str]:
        return {"prompt": f"man {p[1]} {p[0]}\nNAME:", "completion": " " + p[2]}

    meta = {"split": "disjoint by page and description", "pool": len(unique)}
    return [row(p) for p in train], [row(p) for p in val], meta


# --------------------------------------------------------------------------- stdlib code

# Pure-Python standard-library modules and packages present on CPython 3.10 to 3.14 and not
# split out by distributions (no tkinter, idlelib, lib2to3, distutils, ensurepip).
STDLIB_MODULES = (
    "argparse ast asyncio base64 bdb bisect calendar cmd codecs collections colorsys "
    "concurrent configparser contextlib copy csv dataclasses datetime difflib dis email enum "
    "filecmp fileinput fnmatch fractions ftplib functools getopt gettext glob gzip heapq hmac "
    "html http imaplib importlib inspect ipaddress json locale logging lzma mailbox mimetypes "
    "multiprocessing netrc ntpath numbers operator optparse os pdb pickle pkgutil platform "
    "plistlib poplib posixpath pprint pydoc queue quopri random reprlib rlcompleter sched "
    "secrets selectors shelve shlex shutil smtplib socket socketserver statistics string "
    "subprocess symtable tabnanny tarfile tempfile textwrap threading timeit token tokenize "
    "trace traceback tracemalloc types typing urllib uuid warnings wave weakref webbrowser xml "
    "zipapp zipfile zipimport"
).split()

CODE_MAX_LINES = 6
CODE_MAX_CHARS = 220
CODE_ROW_MAX_CHARS = 260


def _stdlib_files(root: Path, name: str) -> list[Path]:
    if (root / f"{name}.py").is_file():
        return [root / f"{name}.py"]
    pkg = root / name
    if not pkg.is_dir():
        return []
    skip = {"test", "tests", "idle_test", "__pycache__"}
    return sorted(p for p in pkg.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def read_stdlib_functions() -> list[tuple[str, str, str]]:
    """(module, code without docstring, first docstring line) of short documented functions.

    Public functions and methods only (no _private or dunder: their docstrings are formulaic);
    code is re-rendered by ast.unparse, which drops comments and decorators, so it depends on
    the Python version (recorded in task.json) but not on formatting.
    """
    return list(_read_stdlib_functions(sysconfig.get_paths()["stdlib"]))


@functools.lru_cache(maxsize=1)
def _read_stdlib_functions(stdlib: str) -> tuple[tuple[str, str, str], ...]:
    out = []
    for name in STDLIB_MODULES:
        for path in _stdlib_files(Path(stdlib), name):
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError):
                continue
            module = ".".join(path.relative_to(stdlib).with_suffix("").parts)
            nodes = list(tree.body)
            for node in tree.body:
                if isinstance(node, ast.ClassDef):
                    nodes += node.body
            for fn in nodes:
                if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                doc = ast.get_docstring(fn)
                if fn.name.startswith("_") or not doc or len(fn.body) < 2:
                    continue
                # the summary sentence: docstrings wrap it over lines, so join the paragraph
                para = _clean(doc.strip().split("\n\n")[0])
                first = re.split(r"(?<=[.!?])\s", para, maxsplit=1)[0]
                if not 3 <= _words(first) <= 16 or not first.isascii():
                    continue
                stripped = copy.deepcopy(fn)
                stripped.body = stripped.body[1:]
                stripped.decorator_list = []
                code = ast.unparse(stripped)
                if code.count("\n") + 1 > CODE_MAX_LINES or len(code) > CODE_MAX_CHARS:
                    continue
                if not code.isascii():
                    continue
                out.append((module.removesuffix(".__init__"), code, first))
    return tuple(out)


def build_code_docstring(n_train: int, n_val: int, seed: int) -> tuple[Rows, Rows, dict]:
    """A short stdlib function's code -> the summary sentence of its docstring.

    Identical code (posixpath/ntpath twins, copied methods) is kept once, so the split is
    disjoint by function body and no validation function was seen in training.
    """

    def row(p: tuple[str, str, str]) -> dict[str, str]:
        return {"prompt": f"# module: {p[0]}\n{p[1]}\n# Summary:", "completion": " " + p[2]}

    seen: set[str] = set()
    pool = []
    for p in read_stdlib_functions():
        # code runs ~2.7 characters per token: keeps prompt + completion under about 96 tokens
        if p[1] not in seen and sum(map(len, row(p).values())) <= CODE_ROW_MAX_CHARS:
            seen.add(p[1])
            pool.append(p)
    random.Random(f"code-docstring:{seed}").shuffle(pool)
    val, train = pool[:n_val], pool[n_val : n_val + n_train]
    root = Path(sysconfig.get_paths()["stdlib"])
    meta = {
        "split": "disjoint by function body",
        "pool": len(pool),
        "modules_missing": [m for m in STDLIB_MODULES if not _stdlib_files(root, m)],
    }
    return [row(p) for p in train], [row(p) for p in val], meta


# --------------------------------------------------------------------------- recipes

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
        # 100 / 300 / 1,000 rather than the example 300 / 1,500 / 6,000: on 2 CPU cores
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


# --------------------------------------------------------------------------- build


def _jsonl(rows: Rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _source_versions(spec: TaskSpec) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for src in spec.sources:
        if src == "python-stdlib":
            versions[src] = f"{platform.python_implementation()} {platform.python_version()}"
        else:
            versions[src] = package_version(src)
    return versions


def build_task(name: str, out_dir: Path, seed: int = 0, limit: int | None = None) -> dict:
    """Build task `name` into out_dir (train.jsonl, val.jsonl, task.json); return the paths.

    `limit` caps both split sizes (for tests); a limited build is the prefix-compatible small
    version of the same task only where the builder is nested (facts), otherwise a smaller draw.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    spec = TASKS[name]
    n_train, n_val = spec.n_train, spec.n_val
    if limit is not None:
        n_train, n_val = min(n_train, limit), min(n_val, limit)
    train, val, meta = spec.builder(n_train, n_val, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "train": out_dir / "train.jsonl",
        "val": out_dir / "val.jsonl",
        "task": out_dir / "task.json",
    }
    atomic_write_text(paths["train"], _jsonl(train))
    atomic_write_text(paths["val"], _jsonl(val))
    info = {
        "task": spec.to_dict(),
        "seed": seed,
        "limit": limit,
        "n_train": len(train),
        "n_val": len(val),
        "sources": _source_versions(spec),
        "builder": meta,
    }
    atomic_write_text(paths["task"], json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return paths


def task_inputs(name: str, out: str | Path, seed: int = 0) -> tuple[str, str, str, dict]:
    """Build a benchmark task's data into OUT/data; return model, train, val and its recipe."""
    if name not in TASKS:
        raise LorankError(f"--task {name}: unknown task; known: {', '.join(TASKS)}")
    spec = TASKS[name]
    try:
        paths = build_task(name, Path(out) / "data", seed=seed)
    except ValueError as err:
        raise LorankError(str(err)) from None
    recipe = {"ranks": ",".join(map(str, spec.ranks)), "lrs": ",".join(f"{x:g}" for x in spec.lrs),
              "seeds": ",".join(map(str, spec.seeds)), "steps": spec.steps,
              "batch_size": spec.batch_size, "max_length": spec.max_length,
              "lora_alpha": spec.lora_alpha, "skip_margin": spec.skip_margin}
    return spec.model, str(paths["train"]), str(paths["val"]), recipe
