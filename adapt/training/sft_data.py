"""SFT data: conversations rendered with a chat template into fixed canvases, and which tokens may be noised.

Each sample becomes one row of `max_length` tokens with two masks beside it, an `adapt.batch.Batch`:
`maskable` (the assistant tokens that are noised and carry loss; the prompt never is, REFERENCE §6) and
`attention_mask` (1 on real tokens). Rows are never packed, so a sample's tokens cannot reach another sample
through bidirectional attention.

A conversation is tokenised segment by segment — prompt text, answer text, prompt text … — where each answer
segment is what the template adds for that assistant turn (its content and end-of-turn marker). The prompt
segment before an answer is exactly what `apply_chat_template(..., add_generation_prompt=True)` renders, so
training sees the same prompt tokens that `dlm-adapt generate --chat` feeds the model.
"""

import json
import sys

import torch

from .batch import Batch
from ..config import SFTDataConfig
from .data import check_data_files, hold_out, load_table
from ..errors import AdaptError

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}### Assistant:\n{{ message['content'] }}{{ eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% else %}### User:\n{{ message['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)

def user_turns(tokenizer, texts: list[str], what: str) -> list[str]:
    """Each text as one user turn of the tokenizer's chat template with the assistant's turn opened: what
    `generate --chat` gives a model, and what a drafter's chat prompts (`data.generate.chat_message`) are. `what`
    names the option in the error when the tokenizer has no template."""
    if not tokenizer.chat_template:
        raise AdaptError(f"{what}: this tokenizer has no chat template")
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            for t in texts]


def resolve_chat_template(tokenizer, cfg: SFTDataConfig) -> str:
    if cfg.chat_template == "default":
        return DEFAULT_CHAT_TEMPLATE
    if cfg.chat_template:
        return cfg.chat_template
    if not tokenizer.chat_template:
        raise AdaptError("the tokenizer has no chat template; set data.chat_template=default (dlm-adapt's plain "
                         "'### User:/### Assistant:' template) or give a Jinja template string")
    return tokenizer.chat_template


def to_messages(row: dict, fmt: str, cfg: SFTDataConfig) -> list[dict]:
    """One record in any supported format as a list of {role, content} messages."""
    if fmt == "messages":
        messages = row[cfg.messages_column]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                      for m in messages):
            raise AdaptError(f"column '{cfg.messages_column}' must hold lists of {{role, content}} messages")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if fmt == "prompt_completion":
        def turns(value, role):
            return value if isinstance(value, list) else [{"role": role, "content": value}]
        return turns(row["prompt"], "user") + turns(row["completion"], "assistant")
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def check_contents(rows: list, fmt: str, cfg: SFTDataConfig, spec: str):
    """Every message's content is text: a number or null would render as "5" or "None" and be trained on.
    Records are counted in file order, before any is held out."""
    for index, row in enumerate(rows):
        try:
            messages = to_messages(row, fmt, cfg)
        except AdaptError as e:
            raise AdaptError(f"{spec} record {index + 1}: {e}") from None
        for turn, m in enumerate(messages):
            if not isinstance(m["content"], str):
                content = json.dumps(m["content"], default=str)
                raise AdaptError(f"{spec} record {index + 1}: message {turn + 1} ({m['role']}) has content "
                                 f"{content}, not text; give every message a text content")


def detect_format(columns: list[str], cfg: SFTDataConfig, spec: str) -> str:
    needed = {"messages": {cfg.messages_column}, "prompt_completion": {"prompt", "completion"},
              "instruction": {"instruction", "output"}}
    if cfg.format != "auto":
        missing = needed[cfg.format] - set(columns)
        if missing:
            raise AdaptError(f"dataset {spec} has no column {', '.join(sorted(missing))} for data.format="
                             f"{cfg.format} (columns: {', '.join(columns)})")
        return cfg.format
    for fmt, cols in needed.items():
        if cols <= set(columns):
            return fmt
    raise AdaptError(f"dataset {spec} has columns {', '.join(columns)}; SFT needs a '{cfg.messages_column}' column "
                     "of conversations, 'prompt' and 'completion', or 'instruction' and 'output' (+ 'input'); set "
                     "data.format and data.messages_column to match")


def tokenize_conversation(messages: list[dict], tokenizer, template: str, train_on: str) -> tuple[list, list]:
    """(ids, trained): token ids of the rendered conversation and, per token, whether it is a trained answer
    token. Messages after the last assistant turn are dropped: nothing after the answer is trained."""
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not answers:
        raise AdaptError("a conversation has no assistant turn, so there is nothing to train on; remove it or fix "
                         "its roles (expected 'user'/'assistant'/'system')")
    messages = messages[: answers[-1] + 1]
    trained_turns = answers if train_on == "all_assistant" else answers[-1:]

    def render(msgs, generation_prompt):
        if not msgs:
            return ""
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    full = render(messages, False)
    segments, pos = [], 0
    for i in trained_turns:
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not (through.startswith(before) and full.startswith(through) and len(before) >= pos):
            raise AdaptError("the chat template does not render a conversation's turns as prefixes of the whole "
                             "(it rewrites earlier turns), so answer spans cannot be located; use "
                             "data.train_on=last_assistant or another data.chat_template")
        segments += [(full[pos:len(before)], False), (full[len(before):len(through)], True)]
        pos = len(through)
    ids, trained = [], []
    for text, is_answer in segments:
        if text:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            trained += [is_answer] * len(piece)
    return ids, trained


def encode(rows, fmt: str, tokenizer, template: str, cfg: SFTDataConfig, what: str) -> Batch:
    """One row of `max_length` tokens per sample, with its masks. Over-long samples: error or drop, never cut."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise AdaptError("the tokenizer has no EOS token to pad answers with")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos  # attention-masked either way
    length = cfg.max_length
    samples, too_long, longest = [], 0, 0
    for index, row in enumerate(rows):
        try:
            ids, trained = tokenize_conversation(to_messages(row, fmt, cfg), tokenizer, template, cfg.train_on)
        except AdaptError as e:
            raise AdaptError(f"{what} sample {index}: {e}") from e
        if len(ids) > length:
            too_long, longest = too_long + 1, max(longest, len(ids))
            continue
        fill = length - len(ids)
        if cfg.eos_padding == "none":
            sample = (ids + [pad] * fill, trained + [False] * fill, [1] * len(ids) + [0] * fill)
        else:
            sample = (ids + [eos] * fill, trained + [cfg.eos_padding == "trained"] * fill, [1] * length)
        samples.append(sample)
    if too_long:
        message = (f"{too_long} {what} samples are longer than data.max_length={length} tokens (the longest has "
                   f"{longest})")
        if cfg.truncation == "error":
            raise AdaptError(f"{message}; raise data.max_length or set data.truncation=drop to skip them")
        print(f"dlm-adapt: dropped {message}", file=sys.stderr)
    if not samples:
        raise AdaptError(f"no {what} samples fit in data.max_length={length} tokens")
    ids, maskable, attention = torch.tensor(samples, dtype=torch.long).unbind(1)
    return Batch(ids, maskable.bool(), attention)


def build_sft_datasets(cfg: SFTDataConfig, tokenizer, max_positions: int | None, seed: int):
    """(train, validation) batches of `max_length`-token rows, and the chat template used."""
    if not cfg.train:
        raise AdaptError("data.train is not set")
    if max_positions is not None and cfg.max_length > max_positions:
        raise AdaptError(f"data.max_length {cfg.max_length} exceeds the model's {max_positions} positions")
    template = resolve_chat_template(tokenizer, cfg)
    check_data_files(cfg.validation)  # before the training data loads: a bad file is the first thing said
    table = load_table(cfg.train, cfg)
    fmt = detect_format(table.column_names, cfg, cfg.train)
    rows = list(table)
    check_contents(rows, fmt, cfg, cfg.train)
    if cfg.validation:
        val_table = load_table(cfg.validation, cfg)
        val_rows, val_fmt = list(val_table), detect_format(val_table.column_names, cfg, cfg.validation)
        check_contents(val_rows, val_fmt, cfg, cfg.validation)
    else:
        rows, val_rows = hold_out(rows, cfg.validation_fraction, seed, cfg.train, "samples")
        val_fmt = fmt
    train = encode(rows, fmt, tokenizer, template, cfg, "training")
    val = encode(val_rows, val_fmt, tokenizer, template, cfg, "validation")
    return train, val[: cfg.max_eval_samples], template
