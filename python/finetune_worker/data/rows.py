"""Raw rows -> checked, normalized examples: every row shape users bring.

Shapes: plain text (``text``); Q&A (``question``/``answer``); instruction (Alpaca's
``instruction``/``input``/``output``); conversations (``messages`` or ``conversations``) whose
turns are OpenAI/transformers ``role``/``content`` (with ``tool_calls`` on assistant turns,
``tool`` turns and a row-level ``tools`` list), ShareGPT's ``from``/``value`` (with
``function_call``/``observation`` turns), or ``input``/``output`` pairs. A turn may carry
Axolotl's per-turn training flag, ``"weight": 0``/``1`` or ``"train": false``/``true``, which
the responses-only mask honours.

A row is normalized to an :class:`Example` or refused with a :class:`RowError` that names the
row, the message, and the keys the row has beside the ones it needed. Nothing here imports
torch or transformers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Longest chat-like row, in characters of message content: far beyond any context length (rows
#: are cut to data.max_seq_length tokens), and a 32 MiB row once made the tokenizer abort the
#: whole worker. Raw text rows may be longer: they are tokenized in pieces and cut into blocks.
MAX_CHAT_ROW_CHARS = 1_000_000

ROW_FORMATS = (
    "auto",
    "text",
    "qa",
    "instruction",
    "conversations",
    "preference",
    "unpaired_preference",
    "prompts",
)
#: The row formats of preference training (a train job's ``preference`` section picks one).
PREFERENCE_FORMATS = frozenset({"preference", "unpaired_preference", "prompts"})

#: Column names the pipeline understands; a ``columns`` mapping must rename onto these.
KNOWN_COLUMNS = frozenset(
    {
        "text",
        "question",
        "answer",
        "system",
        "instruction",
        "input",
        "output",
        "conversations",
        "messages",
        "tools",
    }
)
#: The preference rows' columns (TRL's names); a ``columns`` mapping may rename onto these too.
PREFERENCE_COLUMNS = frozenset({"prompt", "chosen", "rejected", "completion", "label"})

ROLE_MAP = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "human": "user",  # ShareGPT
    "gpt": "assistant",
    "model": "assistant",  # Gemini/Gemma exports
    "function": "tool",  # OpenAI's older function-calling role
    "observation": "tool",  # ShareGPT tool results (LLaMA-Factory)
    "function_call": "assistant",  # ShareGPT tool calls: the value is the call as JSON
}

REQUIRED = {
    "text": ("text",),
    "qa": ("question", "answer"),
    "instruction": ("instruction", "output"),
}
NEEDS = {
    "text": "a text row needs text",
    "qa": "a Q&A row needs question and answer",
    "instruction": "an instruction row needs instruction and output (input is optional)",
}


class RowError(ValueError):
    """A problem with one row; the message already starts with ``row N``."""


@dataclass(frozen=True)
class RowSpec:
    """How a source's rows are read: the row format, column renames, default system prompt."""

    format: str = "auto"
    renames: Mapping[str, str] = field(default_factory=dict)
    system_prompt: str | None = None
    #: The column holding each row's reference answer (GRPO's prompts), if any, and whether every
    #: row must have it (a match reward compares with it).
    reference: str | None = None
    reference_required: bool = False


class _Located:
    """A row that knows where it came from: ``row`` (1-based) and ``origin`` (its file's label)."""

    row: int
    origin: str

    @property
    def where(self) -> str:
        """``"FILE row N"``, as every row error names it."""
        return f"{self.origin} row {self.row}" if self.origin else f"row {self.row}"


@dataclass
class Example(_Located):
    """One validated row: ``text`` for plain text, ``messages`` for everything chat-like.

    ``trained`` holds each message's explicit training flag (None: the default, which is the
    assistant's turns under ``train_on_responses_only``); it is None when no turn has one.
    ``tools`` is the row's tool list in the form chat templates take (``tools=``).
    """

    row: int
    kind: str  # text | qa | instruction | conversations
    text: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    trained: list[bool | None] | None = None
    #: The file the row came from (its label), for errors found later, at tokenization.
    origin: str = ""

    @property
    def has_tool_use(self) -> bool:
        return bool(self.tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in self.messages)

    @property
    def answer(self) -> str | None:
        """The text of the last assistant turn, stripped (its class, for ``loss_weights.classes``);
        None for plain text or a row without one."""
        for message in reversed(self.messages):
            if message["role"] == "assistant":
                content = message.get("content")
                if isinstance(content, list):  # content parts: their text
                    content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
                return content.strip() if isinstance(content, str) else None
        return None


@dataclass
class PreferenceExample(_Located):
    """One validated preference row, as chat messages: a ``prompt`` (ending on the user's turn)
    and either a ``chosen`` and a ``rejected`` answer (DPO, ORPO), one ``completion`` with its
    ``label``, desirable or not (KTO), or nothing more than an optional ``reference`` answer
    (GRPO, which samples the completions itself). Answers are assistant turns."""

    row: int
    kind: str  # preference | unpaired_preference | prompts
    prompt: list[dict[str, Any]]
    chosen: list[dict[str, Any]] | None = None
    rejected: list[dict[str, Any]] | None = None
    completion: list[dict[str, Any]] | None = None
    label: bool | None = None
    reference: str | None = None  # prompts (GRPO): the answer match rewards compare with
    origin: str = ""


AnyExample = Example | PreferenceExample


def rename(row: Any, renames: Mapping[str, str]) -> Any:
    if not renames or not isinstance(row, dict):
        return row
    return {renames.get(k, k): v for k, v in row.items()}


def detect_format(row: Mapping[str, Any]) -> str | None:
    if "messages" in row or "conversations" in row:
        return "conversations"
    if "question" in row or "answer" in row:
        return "qa"
    if "instruction" in row or "output" in row:
        return "instruction"
    if "text" in row:
        return "text"
    return None


def _keys(row: Mapping[str, Any]) -> str:
    return ", ".join(sorted(map(str, row))) or "none"


def normalize(number: int, row: Any, spec: RowSpec) -> Example | PreferenceExample:
    """``row`` (already renamed) as an :class:`Example` (a :class:`PreferenceExample` for the
    preference formats), or :class:`RowError`."""
    where = f"row {number}"
    if not isinstance(row, dict):
        raise RowError(f"{where}: expected an object with named fields, got {type_name(row)}")
    if spec.format in PREFERENCE_FORMATS:
        return normalize_preference(number, row, spec)
    # Columnar files (Parquet, Arrow) give every row every column: a null is an absent value.
    nulls = sorted(str(k) for k, v in row.items() if v is None)
    present = {k: v for k, v in row.items() if v is not None}
    kind = spec.format if spec.format != "auto" else (detect_format(present) or detect_format(row))
    row = present
    if kind is None:
        looks = (
            '; they look like preference rows: train on them with a "preference" section (method dpo, orpo '
            "or kto)"
            if {"chosen", "rejected"} <= set(row) or {"completion", "label"} <= set(row)
            else ""
        )
        raise RowError(
            f"{where}: cannot tell its format from its keys ({_keys(row)}); expected text, question+answer, "
            f"instruction+output, or messages/conversations (data.columns can rename yours){looks}"
        )
    if kind == "conversations":
        messages, trained = _conversation(where, row, spec)
        tools = _tools(where, row.get("tools"))
        return _bounded(Example(number, kind, messages=messages, tools=tools, trained=trained))
    for key in REQUIRED[kind]:
        if key not in row:
            if not row:
                found = f"the row has only nulls ({', '.join(nulls)})" if nulls else "the row has no keys"
            else:
                found = f"the row has {_keys(row)}" + (f"; {', '.join(nulls)} null" if nulls else "")
            raise RowError(f"{where}: missing key {key!r} ({NEEDS[kind]}; {found})")
        _string(where, row, key, allow_empty=False)
    if kind == "text":
        return Example(number, kind, text=row["text"])
    system = _optional_string(where, row, "system") or spec.system_prompt
    if kind == "qa":
        user, answer = row["question"], row["answer"]
    else:
        extra = _optional_string(where, row, "input")
        user = row["instruction"] + (f"\n\n{extra}" if extra else "")
        answer = row["output"]
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return _bounded(Example(number, kind, messages=messages))


def _bounded(example: Example) -> Example:
    size = sum(len(m["content"]) + len(json.dumps(m.get("tool_calls") or "")) for m in example.messages)
    if size > MAX_CHAT_ROW_CHARS:
        raise RowError(
            f"row {example.row}: its messages hold {size:,} characters, over the {MAX_CHAT_ROW_CHARS:,} a "
            f"chat row may have (it would be cut to data.max_seq_length tokens anyway); split it, or put "
            "long documents in text rows"
        )
    return example


def _conversation(
    where: str, row: dict[str, Any], spec: RowSpec
) -> tuple[list[dict[str, Any]], list[bool | None] | None]:
    key = "messages" if "messages" in row else "conversations"
    if key not in row:
        raise RowError(
            f"{where}: missing key 'messages' (a conversation row needs messages; the row has {_keys(row)})"
        )
    turns = row[key]
    if isinstance(turns, str) and turns.lstrip().startswith("["):
        try:  # a conversation stored as a JSON string (a CSV cell, a string column)
            turns = json.loads(turns)
        except json.JSONDecodeError as exc:
            raise RowError(f"{where}: key {key!r} holds invalid JSON: {exc.msg}") from None
    if not isinstance(turns, list):
        raise RowError(f"{where}: key {key!r} must be a list of messages, got {type_name(turns)}")
    if not turns:
        raise RowError(f"{where}: {key!r} is empty")
    messages: list[dict[str, Any]] = []
    flags: list[bool | None] = []
    for i, turn in enumerate(turns, start=1):
        at = f"{where}: {key}[{i}]"
        if not isinstance(turn, dict):
            raise RowError(f"{at}: expected an object, got {type_name(turn)}")
        turn = {k: v for k, v in turn.items() if v is not None}
        flag = _flag(at, turn)
        if "role" not in turn and "from" not in turn and ("input" in turn or "output" in turn):
            for part, role in (("input", "user"), ("output", "assistant")):
                if part not in turn:
                    raise RowError(
                        f"{at}: missing key {part!r} (an input/output turn needs both; it has {_keys(turn)})"
                    )
                _string(at, turn, part, allow_empty=False)
                messages.append({"role": role, "content": turn[part]})
                flags.append(flag if role == "assistant" else None)
            continue
        messages.append(_message(at, turn, first=i == 1))
        flags.append(flag)
    if messages[0]["role"] != "system":
        system = _optional_string(where, row, "system") or spec.system_prompt
        if system:
            messages.insert(0, {"role": "system", "content": system})
            flags.insert(0, None)
    trains = [
        (flag is not False and m["role"] == "assistant") or flag is True
        for m, flag in zip(messages, flags, strict=True)
    ]
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(f"{where}: the conversation has no assistant message, so there is nothing to train on")
    if not any(trains):
        raise RowError(
            f"{where}: every assistant turn is marked not to train (weight 0 / train false), so there is "
            "nothing to train on"
        )
    return messages, (flags if any(f is not None for f in flags) else None)


def _flag(at: str, turn: dict[str, Any]) -> bool | None:
    """The turn's explicit training flag: ``train`` (bool) or Axolotl's ``weight`` (0 or 1)."""
    if "train" in turn:
        if not isinstance(turn["train"], bool):
            raise RowError(f"{at}: 'train' must be true or false, got {type_name(turn['train'])}")
        return bool(turn["train"])
    if "weight" in turn:
        weight = turn["weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
            raise RowError(f"{at}: 'weight' must be 0 or 1 (whether the turn trains), got {weight!r}")
        return weight == 1
    return None


def _message(at: str, turn: dict[str, Any], *, first: bool) -> dict[str, Any]:
    if "role" in turn:
        role_key, content_key = "role", "content"
    elif "from" in turn:
        role_key, content_key = "from", "value"
    else:
        raise RowError(
            f"{at}: no role: a message needs role and content (OpenAI), from and value (ShareGPT), or "
            f"input and output; it has {_keys(turn)}"
        )
    raw_role = turn[role_key]
    role = ROLE_MAP.get(raw_role.lower()) if isinstance(raw_role, str) else None
    if role is None:
        raise RowError(
            f"{at}: unknown role {raw_role!r} (expected system, user, assistant, tool, or ShareGPT's "
            "human, gpt, function_call, observation)"
        )
    if role == "system" and not first:
        raise RowError(f"{at}: a system message must come first")
    message: dict[str, Any] = {"role": role}
    if raw_role == "function_call":  # ShareGPT: the value is the call {"name", "arguments"} (or a list)
        calls = _json_value(at, content_key, turn.get(content_key))
        message["content"] = ""
        message["tool_calls"] = _tool_calls(at, calls if isinstance(calls, list) else [calls])
        return message
    calls = turn.get("tool_calls")
    if calls is not None and role != "assistant":
        raise RowError(f"{at}: only assistant turns make tool calls (this one is {raw_role!r})")
    if content_key not in turn and not (calls and role == "assistant"):
        raise RowError(
            f"{at}: missing key {content_key!r} (a {role} message needs its {content_key}, which may be null "
            f"only on an assistant turn that calls tools; it has {_keys(turn)})"
        )
    message["content"] = _content(at, content_key, turn.get(content_key), tool=role == "tool")
    if calls is not None:
        if isinstance(calls, str):
            calls = _json_value(at, "tool_calls", calls)
        if not isinstance(calls, list):
            raise RowError(f"{at}: 'tool_calls' must be a list, got {type_name(calls)}")
        message["tool_calls"] = _tool_calls(at, calls)
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(turn.get(key), str):
                message[key] = turn[key]
    return message


def _content(at: str, key: str, value: Any, *, tool: bool) -> str:
    if value is None:
        return ""  # an assistant turn that only calls tools
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        # OpenAI's content parts: text parts are joined; any other part cannot be trained on here.
        texts = []
        for j, part in enumerate(value, start=1):
            if part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                raise RowError(
                    f"{at}: content part {j} is {part.get('type', 'untyped')!r}; only text parts can be "
                    'trained on (a text part is {"type": "text", "text": ...})'
                )
            texts.append(part["text"])
        return "".join(texts)
    if tool and isinstance(value, (dict, list, int, float, bool)):
        return json.dumps(value, ensure_ascii=False)  # a tool's structured result, as the model sees it
    raise RowError(f"{at}: key {key!r} must be a string, got {type_name(value)}")


def _json_value(at: str, key: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise RowError(f"{at}: {key!r} holds invalid JSON: {exc.msg}") from None


def _tool_calls(at: str, calls: list[Any]) -> list[dict[str, Any]]:
    """Tool calls in the form chat templates take: ``{"type": "function", "function": {"name",
    "arguments": {...}}}``; OpenAI's JSON-string arguments become the object they encode."""
    out = []
    for j, call in enumerate(calls, start=1):
        where = f"{at}.tool_calls[{j}]"
        if not isinstance(call, dict):
            raise RowError(f"{where}: expected an object, got {type_name(call)}")
        function = call.get("function", call)  # OpenAI nests it; ShareGPT/glaive rows are flat
        if (
            not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not function["name"]
        ):
            raise RowError(f"{where}: needs a function name (function.name); it has {_keys(call)}")
        arguments = function.get("arguments", function.get("parameters", {}))
        if isinstance(arguments, str):
            if not arguments.strip():
                arguments = {}
            else:
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError as exc:
                    raise RowError(f"{where}: arguments are not valid JSON ({exc.msg})") from None
        if not isinstance(arguments, dict):
            raise RowError(f"{where}: arguments must be an object, got {type_name(arguments)}")
        entry: dict[str, Any] = {
            "type": "function",
            "function": {"name": function["name"], "arguments": arguments},
        }
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def _tools(where: str, value: Any) -> list[dict[str, Any]] | None:
    """The row's tool definitions as ``{"type": "function", "function": {...}}`` schemas."""
    if value is None:
        return None
    value = _json_value(where, "tools", value)
    if not isinstance(value, list):
        raise RowError(f"{where}: 'tools' must be a list of function schemas, got {type_name(value)}")
    out = []
    for j, tool in enumerate(value, start=1):
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
            spec = tool["function"]
        elif isinstance(tool, dict):
            spec = tool
        else:
            raise RowError(f"{where}: tools[{j}]: expected a function schema object, got {type_name(tool)}")
        if not isinstance(spec.get("name"), str) or not spec["name"]:
            raise RowError(f"{where}: tools[{j}]: a tool needs a name; it has {_keys(spec)}")
        out.append({"type": "function", "function": spec})
    return out or None


def _string(where: str, row: Mapping[str, Any], key: str, *, allow_empty: bool) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"{where}: key {key!r} must be a string, got {type_name(value)}")
    if not allow_empty and not value.strip():
        raise RowError(f"{where}: key {key!r} is empty")
    return value


def _optional_string(where: str, row: Mapping[str, Any], key: str) -> str | None:
    if row.get(key) is None:
        return None
    return _string(where, row, key, allow_empty=True)


def type_name(value: Any) -> str:
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)


# ---- preference rows ------------------------------------------------------------------------------

PREFERENCE_NEEDS = {
    "prompts": "a GRPO row needs a prompt (or a question)",
    "preference": "a preference row needs chosen and rejected, and a prompt unless both are "
    "conversations that open with it",
    "unpaired_preference": "a KTO row needs prompt, completion and label (true: desirable)",
}


def normalize_preference(number: int, row: dict[str, Any], spec: RowSpec) -> PreferenceExample:
    """A preference row in any of TRL's shapes, as chat messages.

    Text or conversations: ``{"prompt": "...", "chosen": "...", "rejected": "..."}``;
    ``{"prompt": [turns], "chosen": [assistant turns], "rejected": [...]}``; an implicit prompt
    (``chosen`` and ``rejected`` whole conversations sharing their opening turns); UltraFeedback's
    ``prompt`` string with whole conversations that repeat it. KTO: ``prompt``, ``completion`` and
    a boolean ``label``.
    """
    where = f"row {number}"
    present = {k: v for k, v in row.items() if v is not None}
    kind = spec.format
    if kind == "prompts":
        return _prompt_row(number, where, present, spec)
    answers = ("chosen", "rejected") if kind == "preference" else ("completion",)
    needed = [*answers, *(["prompt", "label"] if kind == "unpaired_preference" else [])]
    for key in needed:
        if key not in present:
            nulls = sorted(str(k) for k, v in row.items() if v is None)
            found = f"the row has {_keys(present)}" + (f"; {', '.join(nulls)} null" if nulls else "")
            raise RowError(f"{where}: missing key {key!r} ({PREFERENCE_NEEDS[kind]}; {found})")
    turns = {key: _preference_turns(where, present[key], key) for key in answers}
    if "prompt" in present:
        prompt = _preference_turns(where, present["prompt"], "prompt")
        for key in answers:  # UltraFeedback: each answer repeats the prompt's turns
            if len(turns[key]) > len(prompt) and turns[key][: len(prompt)] == prompt:
                turns[key] = turns[key][len(prompt) :]
    else:
        prompt = _implicit_prompt(where, turns["chosen"], turns["rejected"])
        turns = {key: value[len(prompt) :] for key, value in turns.items()}
    prompt = _finish_prompt(where, prompt, present, spec)
    for key, value in turns.items():
        if value[0]["role"] != "assistant":
            raise RowError(
                f"{where}: {key!r} must be the assistant's answer (its first turn is {value[0]['role']})"
            )
    _check_size(where, [prompt, *turns.values()])
    if kind == "unpaired_preference":
        label = present["label"]
        if label in (0, 1) and not isinstance(label, float):
            label = bool(label)
        if not isinstance(label, bool):
            raise RowError(f"{where}: 'label' must be true (desirable) or false, got {label!r}")
        return PreferenceExample(number, kind, prompt, completion=turns["completion"], label=label)
    if turns["chosen"] == turns["rejected"]:
        raise RowError(
            f"{where}: chosen and rejected are the same answer, so there is no preference to learn"
        )
    return PreferenceExample(number, kind, prompt, chosen=turns["chosen"], rejected=turns["rejected"])


def _prompt_row(number: int, where: str, row: dict[str, Any], spec: RowSpec) -> PreferenceExample:
    """A GRPO row: its prompt (``prompt``, or a Q&A row's ``question``) and reference answer."""
    key = "prompt" if "prompt" in row else "question"
    if key not in row:
        raise RowError(
            f"{where}: missing key 'prompt' ({PREFERENCE_NEEDS['prompts']}; the row has {_keys(row)})"
        )
    prompt = _finish_prompt(where, _preference_turns(where, row[key], "prompt"), row, spec)
    _check_size(where, [prompt])
    reference = None
    if spec.reference is not None and (spec.reference in row or spec.reference_required):
        if spec.reference not in row:
            raise RowError(
                f"{where}: missing key {spec.reference!r} (the reference answer that preference.rewards "
                f"compare with; the row has {_keys(row)}; preference.reference_column names another)"
            )
        reference = row[spec.reference]
        if not isinstance(reference, str):
            reference = json.dumps(reference) if isinstance(reference, (list, dict)) else str(reference)
    return PreferenceExample(number, "prompts", prompt, reference=reference)


def _finish_prompt(
    where: str, prompt: list[dict[str, Any]], row: dict[str, Any], spec: RowSpec
) -> list[dict[str, Any]]:
    """The row's system prompt first (its ``system`` key, else data.system_prompt), and a prompt that
    ends with the user's turn."""
    if prompt[0]["role"] != "system":
        system = _optional_string(where, row, "system") or spec.system_prompt
        if system:
            prompt = [{"role": "system", "content": system}, *prompt]
    if prompt[-1]["role"] in ("assistant", "system"):
        raise RowError(
            f"{where}: the prompt must end with the user's turn (its last turn is {prompt[-1]['role']})"
        )
    return prompt


def _check_size(where: str, parts: list[list[dict[str, Any]]]) -> None:
    size = sum(len(m["content"]) for part in parts for m in part)
    if size > MAX_CHAT_ROW_CHARS:
        raise RowError(
            f"{where}: its messages hold {size:,} characters, over the {MAX_CHAT_ROW_CHARS:,} a chat row may have"
        )


def _preference_turns(where: str, value: Any, key: str) -> list[dict[str, Any]]:
    """A prompt or answer as messages: a string is one user (prompt) or assistant turn."""
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        value = _json_value(where, key, value)  # a conversation stored as JSON text (a CSV cell)
    if isinstance(value, str):
        if not value.strip():
            raise RowError(f"{where}: key {key!r} is empty")
        return [{"role": "user" if key == "prompt" else "assistant", "content": value}]
    if not isinstance(value, list) or not value:
        raise RowError(
            f"{where}: key {key!r} must be a string or a non-empty list of messages, got {type_name(value)}"
        )
    out = []
    for i, turn in enumerate(value, start=1):
        at = f"{where}: {key}[{i}]"
        if not isinstance(turn, dict):
            raise RowError(f"{at}: expected an object, got {type_name(turn)}")
        message = _message(at, {k: v for k, v in turn.items() if v is not None}, first=i == 1)
        if message.get("tool_calls") or message["role"] == "tool":
            raise RowError(f"{at}: tool calls and tool turns are not supported in preference rows yet")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _implicit_prompt(
    where: str, chosen: list[dict[str, Any]], rejected: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The turns two whole conversations open with, up to the answers where they part."""
    shared = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        shared += 1
    if shared == 0 or shared >= min(len(chosen), len(rejected)):
        raise RowError(
            f"{where}: no prompt: without a 'prompt' key, chosen and rejected must be conversations that "
            "open with the same turns and then differ in the assistant's answer (or name the prompt column "
            "in data.columns)"
        )
    return chosen[:shared]
