"""Exact tokens and loss masks of single conversations (ConversationEncoder)."""

from __future__ import annotations

import numpy as np
import pytest

from stages.preprocess.chat import (
    DROPPED_TOO_LONG,
    OK,
    ChatColumns,
    ConversationEncoder,
)
from stages.runtime import StageInputError

QUESTION = "What is 2 + 2?\n\nA: 3\nB: 4"
ANSWER = "<think>\nAdd them: 2 + 2 = 4.\n</think>\n\nThe answer is (B)."


def encode(tokenizer, rows: dict, seq_len: int = 512, truncate: bool = True, **columns) -> dict:
    encoder = ConversationEncoder(tokenizer, ChatColumns(**columns), seq_len, truncate)
    return encoder(rows, list(range(len(next(iter(rows.values()))))))


def assistant_text(tokenizer, out: dict, row: int = 0) -> str:
    ids, labels = np.array(out["input_ids"][row]), np.array(out["labels"][row])
    assert (labels[labels != -100] == ids[labels != -100]).all()  # HF convention: labels = ids
    return tokenizer.decode(ids[labels != -100].tolist())


def test_template_applied_and_loss_only_on_the_assistant_turn(tokenizer):
    out = encode(tokenizer, {"input": [QUESTION], "output": [ANSWER]})
    assert out["status"] == [OK]
    assert tokenizer.decode(out["input_ids"][0]) == (
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n{ANSWER}<|im_end|>\n"
    )
    # The assistant content and its end-of-turn token, not the role header or the newline after.
    assert assistant_text(tokenizer, out) == f"{ANSWER}<|im_end|>"
    labels = np.array(out["labels"][0])
    trained = np.flatnonzero(labels != -100)
    assert (np.diff(trained) == 1).all()  # one contiguous run
    assert out["input_ids"][0][trained[-1]] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert labels[-1] == -100  # the trailing "\n"


def test_system_prompt_is_prepended_and_not_trained_on(tokenizer):
    out = encode(tokenizer, {"input": [QUESTION], "output": [ANSWER]}, system_prompt="You are a scientist.")
    text = tokenizer.decode(out["input_ids"][0])
    assert text.startswith("<|im_start|>system\nYou are a scientist.<|im_end|>\n<|im_start|>user\n")
    assert assistant_text(tokenizer, out) == f"{ANSWER}<|im_end|>"


def test_messages_column_trains_every_assistant_turn(tokenizer):
    chat = [
        {"role": "user", "content": "Name a noble gas."},
        {"role": "assistant", "content": "Neon."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Argon."},
    ]
    out = encode(tokenizer, {"messages": [chat]}, messages_column="messages")
    assert out["status"] == [OK]
    # The last turn is rendered with an (empty) think block by the Qwen-style template.
    assert assistant_text(tokenizer, out) == "Neon.<|im_end|><think>\n\n</think>\n\nArgon.<|im_end|>"


def test_truncation_keeps_seq_len_tokens_or_drops(tokenizer):
    rows = {"input": [QUESTION], "output": [ANSWER + " Long reasoning." * 40]}
    full = encode(tokenizer, rows)["full_length"][0]
    cut = encode(tokenizer, rows, seq_len=64)
    assert full > 64 and cut["status"] == [OK] and cut["truncated"] == [True]
    assert len(cut["input_ids"][0]) == 64 and cut["full_length"] == [full]
    dropped = encode(tokenizer, rows, seq_len=64, truncate=False)
    assert dropped["status"] == [DROPPED_TOO_LONG] and dropped["input_ids"] == [[]]


def test_bad_rows_get_a_reason(tokenizer):
    rows = {"input": [QUESTION, QUESTION, QUESTION * 20, QUESTION], "output": ["", None, ANSWER, " \n"]}
    out = encode(tokenizer, rows, seq_len=32)
    assert out["status"] == ["bad: empty output", "bad: output is null, not a string",
                             "bad: no assistant tokens after truncation", "bad: empty output"]
    assert out["row"] == [0, 1, 2, 3]


def test_a_value_of_the_wrong_type_is_named_as_such(tokenizer):
    """A parquet/hub column of numbers reaches the encoder as numbers: not "empty output"."""
    out = encode(tokenizer, {"input": [QUESTION, 7], "output": [4, ANSWER]})
    assert out["status"] == ["bad: output is a number (4), not a string", "bad: input is a number (7), not a string"]
    chats = {"messages": [[{"role": "user", "content": QUESTION}, {"role": "assistant", "content": 4}],
                          "not a chat", [{"role": "user", "content": QUESTION}]]}
    out = encode(tokenizer, chats, messages_column="messages")
    assert out["status"] == ["bad: messages[1].content is a number (4), not a string",
                             "bad: messages is a string ('not a chat'), not a list of {role, content}",
                             "bad: no assistant turn"]


def test_tokenizer_without_chat_template_is_refused(tokenizer):
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    with pytest.raises(StageInputError, match="tokenizer: has no chat_template"):
        ConversationEncoder(plain, ChatColumns(), 64, True)
