"""Render rows as chats with the tokenizer's own chat template and mark the assistant tokens.

How the loss mask is found, for any template that renders a chat as a growing prefix:
an assistant turn i starts where `render(messages[:i], add_generation_prompt=True)` ends and
runs to the end of the first end-of-turn token (the tokenizer's eos, `<|im_end|>` for Qwen)
after that, inclusive, so the model learns to stop. Those are character spans of the rendered
text; the text is tokenized once (batched, with offsets) and a token is an assistant token when
it starts inside a span. Labels follow Hugging Face's convention: `labels[t] = input_ids[t]` on
assistant tokens and -100 elsewhere; the model shifts them.
"""

from __future__ import annotations

import hashlib
from typing import Any

import datasets

from stages.preprocess.rows import ChatColumns, as_chat, row_problem
from stages.runtime import StageInputError

__all__ = ["ChatColumns", "ConversationEncoder", "tokenizer_hash"]

IGNORE_INDEX = -100

# Status of a row after encoding; anything starting with "bad:" is a bad row.
OK = "ok"
DROPPED_TOO_LONG = "dropped: longer than seq_len"

ENCODED_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "labels": datasets.List(datasets.Value("int32")),
    "row": datasets.Value("int64"),
    "status": datasets.Value("string"),
    "truncated": datasets.Value("bool"),
    "full_length": datasets.Value("int64"),
})


def tokenizer_hash(tokenizer: Any) -> str:
    """Content hash of what decides the tokens: vocab/merges/normalisers, template, specials."""
    digest = hashlib.sha256()
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update((tokenizer.chat_template or "").encode())
    digest.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    return digest.hexdigest()


def _span_tokens(encoding: Any, begin: int, end: int) -> tuple[int, int]:
    """Token range [first, last) of the tokens that start inside characters [begin, end).

    Byte-level tokens cover every character, so the token holding `begin` is the first one
    unless it started earlier (then the next one is), and the token holding `end - 1` is the last.
    """
    first = encoding.char_to_token(begin)
    last = encoding.char_to_token(end - 1)
    if first is None or last is None:  # a normaliser dropped characters: count token by token
        starts = [start for start, _ in encoding.offsets]
        inside = [number for number, start in enumerate(starts) if begin <= start < end]
        return (inside[0], inside[-1] + 1) if inside else (0, 0)
    if encoding.token_to_chars(first)[0] < begin:
        first += 1
    return first, last + 1


class ConversationEncoder:
    """Batched `datasets.map` function: rows -> input_ids, labels and a status per row."""

    def __init__(self, tokenizer: Any, columns: ChatColumns, seq_len: int, truncate: bool) -> None:
        if not tokenizer.chat_template:
            raise StageInputError("tokenizer: has no chat_template; use a chat/instruct tokenizer")
        if tokenizer.eos_token is None:
            raise StageInputError("tokenizer: has no eos_token to end assistant turns")
        self.tokenizer = tokenizer
        self.columns = columns
        self.seq_len = seq_len
        self.truncate = truncate

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {name: [] for name in ENCODED_FEATURES}
        if not indices:
            return out
        chats, statuses = zip(*(self._chat(batch, index) for index in range(len(indices))))
        usable = [index for index, chat in enumerate(chats) if chat]
        texts: list[str] = [""] * len(chats)  # bad rows tokenize as empty text
        spans: list[list[tuple[int, int]]] = [[] for _ in chats]
        for index, text, chat_spans in zip(usable, *self._render([chats[index] for index in usable])):
            texts[index], spans[index] = text, chat_spans
        # The Rust tokenizer directly: one batched call, offsets without a Python dict per token.
        encodings = self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        for index, row in enumerate(indices):
            encoding = encodings[index]
            ids: list[int] = encoding.ids
            labels = [IGNORE_INDEX] * len(ids)
            status = statuses[index]
            for begin, end in spans[index] if status == OK else []:
                first, last = _span_tokens(encoding, begin, end)
                labels[first:last] = ids[first:last]
            full_length = len(ids)
            truncated = False
            if status == OK and full_length > self.seq_len:
                if self.truncate:
                    ids, labels, truncated = ids[: self.seq_len], labels[: self.seq_len], True
                else:
                    status = DROPPED_TOO_LONG
            if status == OK and labels.count(IGNORE_INDEX) == len(labels):
                status = "bad: no assistant tokens after truncation" if truncated else "bad: no assistant tokens"
            keep = status == OK
            out["input_ids"].append(ids if keep else [])
            out["labels"].append(labels if keep else [])
            out["row"].append(row)
            out["status"].append(status)
            out["truncated"].append(truncated and keep)
            out["full_length"].append(full_length)
        return out

    def _chat(self, batch: dict[str, list[Any]], index: int) -> tuple[list[dict[str, str]], str]:
        row = {name: batch[name][index] for name in self.columns.required()}
        problem = row_problem(row, self.columns)
        if problem:
            return [], f"bad: {problem}"
        return as_chat(row, self.columns), OK

    def _render(self, chats: list[list[dict[str, str]]]) -> tuple[list[str], list[list[tuple[int, int]]]]:
        """Rendered texts and their assistant character spans; one batched template call for
        the chats and one for all the prompts before assistant turns (fewer per-call costs)."""
        if not chats:
            return [], []
        template = self.tokenizer.apply_chat_template
        texts: list[str] = template(chats, tokenize=False)
        turns = [(number, turn) for number, chat in enumerate(chats) for turn, message in enumerate(chat)
                 if message["role"] == "assistant"]
        prompts = [chats[number][:turn] for number, turn in turns if turn]
        rendered = iter(template(prompts, tokenize=False, add_generation_prompt=True) if prompts else [])
        eos = self.tokenizer.eos_token
        spans: list[list[tuple[int, int]]] = [[] for _ in chats]
        for number, turn in turns:
            prefix = next(rendered) if turn else ""
            text = texts[number]
            if not text.startswith(prefix):
                raise StageInputError(
                    "tokenizer: its chat template does not render a chat as a growing prefix, so "
                    "assistant tokens cannot be located; use a Qwen/Llama-style template"
                )
            stop = text.find(eos, len(prefix))
            spans[number].append((len(prefix), len(text) if stop < 0 else stop + len(eos)))
        return texts, spans
