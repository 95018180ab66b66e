"""Data formats: the columns each format needs, checking records, and tokenizing them with
loss masks (only completion / assistant tokens carry loss)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorank.errors import LorankError

IGNORE_INDEX = -100

# format -> columns it needs (detection tries them in this order)
FORMATS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt-completion": ("prompt", "completion"),
    "classification": ("text", "label"),
    "text": ("text",),
}
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def detect_format(records: list[dict[str, Any]], source: str = "data") -> str:
    """The first format whose columns the records hold (see FORMATS)."""
    if not records:
        raise LorankError(f"{source}: empty dataset (no records)")
    columns = set(records[0])
    for name, needed in FORMATS.items():
        if all(c in columns for c in needed):
            return name
    known = "; ".join(f"{n}: {', '.join(c)}" for n, c in FORMATS.items())
    raise LorankError(
        f"{source}: unknown columns {sorted(columns)}; expected one of the formats ({known})"
    )


def check_columns(records: list[dict[str, Any]], fmt: str, source: str = "data") -> None:
    """Every record must have the format's columns; name the first record that does not."""
    if fmt not in FORMATS:
        raise LorankError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    for i, record in enumerate(records, 1):
        missing = [c for c in FORMATS[fmt] if c not in record or record[c] is None]
        if missing:
            raise LorankError(f"{source}: record {i}: missing field '{missing[0]}' for format {fmt}")
        problem = _field_problem(record, fmt)
        if problem:
            raise LorankError(f"{source}: record {i}: {problem}")


TEXT_FIELDS = ("text", "prompt", "completion", "instruction", "input", "output")


def _field_problem(record: dict[str, Any], fmt: str) -> str | None:
    """What is wrong with a record's values for `fmt` (None if nothing): a list or an object
    where text belongs would otherwise be tokenized as its Python repr, and a malformed chat
    message fail deep inside the tokenizer's template."""
    for name in (*FORMATS[fmt], *(("input",) if fmt == "alpaca" else ())):  # alpaca's optional
        value = record.get(name)
        if name in TEXT_FIELDS and isinstance(value, (list, dict)):
            kind = "list" if isinstance(value, list) else "object"
            return f"field '{name}': expected text, got a JSON {kind}"
        if name in TEXT_FIELDS and _lone_surrogate(value):
            return f"field '{name}': {NOT_UNICODE}"
    if fmt == "classification" and isinstance(record["label"], (list, dict)):
        return "field 'label': expected a class name or number"
    if fmt == "chat":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return "field 'messages': expected a non-empty list of {role, content} objects"
        for j, message in enumerate(messages):
            if not isinstance(message, dict):
                return f"messages[{j}]: expected an object with 'role' and 'content'"
            if not isinstance(message.get("role"), str):
                return f"messages[{j}]: expected a string 'role'"
            content = message.get("content")
            # content parts (a list) and a tool call without content are the templates' to read
            if not (isinstance(content, (str, list)) or content is None and "tool_calls" in message):
                return f"messages[{j}]: expected a string 'content'"
            if _lone_surrogate(message):
                return f"messages[{j}]: {NOT_UNICODE}"
    return None


NOT_UNICODE = "not valid Unicode text (a lone surrogate, as a JSON escape like \\ud800 makes)"


def _lone_surrogate(value: Any) -> bool:
    """Whether a string in `value` (searched through lists and objects) holds a lone UTF-16
    surrogate, which JSON escapes can make but no tokenizer encodes."""
    if isinstance(value, str):
        if value.isascii():
            return False
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_lone_surrogate(k) or _lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_lone_surrogate(v) for v in value)
    return False


# ---------------------------------------------------------------------------------------------
# tokenizing


def tokenize(record: dict[str, Any], fmt: str, tokenizer, max_length: int,
             label_ids: dict[str, int] | None = None) -> dict[str, Any] | None:
    """One record -> tokenized example, or None when truncation leaves no supervised token."""
    if fmt == "classification":
        ids = tokenizer(str(record["text"]), truncation=True, max_length=max_length)["input_ids"]
        return {"input_ids": list(ids), "labels": label_ids[str(record["label"])]}
    if fmt == "chat":
        ids, labels = _chat_tokens(record["messages"], tokenizer)
    else:
        prompt, completion = _prompt_completion(record, fmt)
        prompt_ids = _encode(tokenizer, prompt, special=True) if prompt else []
        completion_ids = _encode(tokenizer, completion, special=not prompt)
        if tokenizer.eos_token_id is not None:
            completion_ids = completion_ids + [tokenizer.eos_token_id]
        ids = prompt_ids + completion_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    ids, labels = ids[:max_length], labels[:max_length]
    if all(lab == IGNORE_INDEX for lab in labels[1:]):  # the first label is never predicted
        return None
    return {"input_ids": ids, "labels": labels}


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _prompt_completion(record: dict[str, Any], fmt: str) -> tuple[str, str]:
    if fmt == "text":
        return "", str(record["text"])
    if fmt == "prompt-completion":
        return str(record["prompt"]), str(record["completion"])
    if fmt == "alpaca":
        extra = record.get("input") or ""
        template = ALPACA_PROMPT_INPUT if extra else ALPACA_PROMPT
        return template.format(instruction=record["instruction"], input=extra), str(record["output"])
    raise LorankError(f"format {fmt}: not a generation format")


def _chat_tokens(messages: list[dict[str, str]], tokenizer) -> tuple[list[int], list[int]]:
    """Render with the chat template; supervise only assistant turns, found by prefix lengths:
    a turn starts where the conversation before it, with the generation prompt, ends (an
    opening turn, with nothing before it, after the tokens it shares with itself emptied of
    content: its header). A template that rejects the conversation is a `LorankError`."""
    if not getattr(tokenizer, "chat_template", None):
        raise LorankError("format chat: the model's tokenizer has no chat template")

    def render(msgs, gen):
        try:
            out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        except Exception as err:  # the template's own checks (raise_exception) and failures
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise LorankError(f"the chat template rejects the conversation ({reason})") from None
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)

    ids = render(messages, False)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if i:
            start = len(render(messages[:i], True))
        else:  # no conversation before it to render
            empty = render([{**message, "content": ""}], False)
            shared = zip(ids, empty, strict=False)
            start = next((j for j, (a, b) in enumerate(shared) if a != b),
                         min(len(ids), len(empty)))
        end = len(render(messages[: i + 1], False))
        labels[start:end] = ids[start:end]
    return ids, labels


def check_labels(label_ids: dict[str, int], source: str | Path) -> None:
    if len(label_ids) < 2:
        raise LorankError(f"{source}: every record has the label {next(iter(label_ids))!r}; "
                          "classification needs at least two classes")


def label_vocabulary(records: list[dict[str, Any]]) -> dict[str, int]:
    """Label string -> class id, sorted so the mapping does not depend on record order."""
    labels = sorted({str(r["label"]) for r in records})
    return {lab: i for i, lab in enumerate(labels)}
