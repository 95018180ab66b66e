"""Three tasks from WordNet 3.0 (Debian `wordnet-base`): an entry in plain words -> the same
content as a JSON record (`format-json`), a thesaurus chat (`wordnet-chat`), and a definition
-> its supersense (`wordnet-lexname`).

`read_wordnet` parses the database files under `WORDNET_DIR` once per directory. Each
builder's split is disjoint by synset (and more, as its meta says).
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from lorank.bench.tasks.source_text import Rows, _clean, _require, _words

# Where the Debian package puts its data (module-level so tests can point it elsewhere).
WORDNET_DIR = Path("/usr/share/wordnet")


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
