"""Function calling: the generic tool prompt, the grammar that makes a call valid, and the
parser that turns marked output back into calls (whole, or piece by piece for streams).

A call is written as Hermes-style markup, the format most open models were tuned on:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

With `tool_choice` `required` or a named function the grammar holds from the first token;
with `auto` the answer is free text in which the marker can only begin a valid call (a
listed name, arguments valid against that function's parameters), or, given a JSON answer
schema (`response_format`), either calls from the first token or a JSON document valid
against that schema: the answer's first character tells which. That grammar is written
out whole (text that doesn't contain the marker, then calls) rather than as llama.cpp's lazy
grammar: a lazy grammar replays the token that completes its trigger, and a token carrying
more text after the marker than the grammar allows aborts the process inside llama.cpp.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.engine.call_head import could_begin_head, match_head
from server.engine.constraints import ConstraintError, check_schema, schema_grammar

TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"
# A tool's result, as the conversation shows it (in a user turn: server/api/tool_calls.py).
RESULT_OPEN = "<tool_response>"
RESULT_CLOSE = "</tool_response>"
# The free-text automaton below restarts a match only on the marker's first character.
assert TOOL_OPEN.count(TOOL_OPEN[0]) == 1
# A JSON document never begins with the marker's first character: the parser tells a JSON
# answer from calls by it.
assert TOOL_OPEN[0] not in '{["-0123456789tfn'


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: Mapping[str, Any]


def tool_prompt(functions: Sequence[Function], required: bool,
                answer: Mapping[str, Any] | None = None) -> str:
    """The system-prompt text that shows the functions and the call format, and (`answer`:
    a JSON response format beside tools `auto`) the schema a final answer takes: the
    grammar holds the answer to it, but a model that was never told would rather call."""
    listed = "\n".join(json.dumps({"name": f.name, "description": f.description,
                                   "parameters": f.parameters}, ensure_ascii=False)
                       for f in functions)
    if required:
        must = "You must call one of them."
    elif answer is not None:
        must = ("Call one when it helps to answer; otherwise answer with only a JSON document "
                f"valid against this schema: {json.dumps(answer, ensure_ascii=False)}")
    else:
        must = "Call one when it helps to answer; otherwise answer in text."
    return (f"You can call these functions:\n{listed}\n{must} To call a function, write "
            f'{TOOL_OPEN}\n{{"name": <function name>, "arguments": <arguments object>}}\n'
            f"{TOOL_CLOSE}")


def call_markup(name: str, arguments: str) -> str:
    """A call as it appears in the conversation (earlier assistant turns)."""
    try:
        args: object = json.loads(arguments)
    except ValueError:
        args = arguments
    return f"{TOOL_OPEN}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}" \
           f"\n{TOOL_CLOSE}"


def tools_grammar(functions: Sequence[Function], *, parallel: bool, required: bool,
                  answer: Mapping[str, Any] | None = None, answer_param: str = "answer"
                  ) -> str:
    """GBNF for the answer: one call (or several, if `parallel`) of the listed functions,
    preceded (unless `required`) by free text that never contains the marker; or, with an
    `answer` schema and not `required`, calls or a JSON document valid against `answer` (a
    final answer in the schema's shape: OpenAI's structured outputs beside tools). Each
    function's parameters must be a schema the grammar enforces exactly; a ConstraintError
    names the function by its index in `functions`, or the answer schema by `answer_param`."""
    alternatives, defs = _alternatives(functions, schema_grammar)
    if answer is not None:
        # Checked even where calls are required, so a bad schema is refused alike.
        try:
            schema_grammar(answer)
        except ConstraintError as exc:
            raise ConstraintError(f"{answer_param}: {exc}") from None
    calls = _calls_rule(parallel)
    if answer is not None and not required:
        return _calls_or_document(alternatives, defs, answer, calls)
    call = schema_grammar({"anyOf": alternatives, "$defs": defs})
    call = re.sub(r"^root ::=", "tool-call ::=", call, flags=re.MULTILINE)
    if required:
        return f'root ::= "{TOOL_OPEN}" calls\n{calls}\n{call}'
    return f"root ::= free-0\n{_free_text_rules()}\n{calls}\n{call}"


def _calls_rule(parallel: bool) -> str:
    """The calls after the first marker: one, or (`parallel`) more, each on its own lines."""
    rest = f'"\\n" tool-call "\\n{TOOL_CLOSE}"'
    more = f' ("\\n{TOOL_OPEN}\\n" tool-call "\\n{TOOL_CLOSE}")*' if parallel else ""
    return f"calls ::= {rest}{more}"


def _calls_or_document(alternatives: list[dict[str, Any]], defs: dict[str, Any],
                       answer: Mapping[str, Any], calls: str) -> str:
    """Calls from the first token, or a JSON document valid against `answer` (which never
    begins with the marker's `<`). One conversion for both keeps their rules apart: the
    converter names each branch's rule in the root's alternation."""
    document = _hoist_defs(answer, "answer-", defs)
    try:
        grammar = schema_grammar({"anyOf": [{"anyOf": alternatives}, document],
                                  "$defs": defs})
    except ConstraintError as exc:  # each part converted alone: their sum is too large
        raise ConstraintError(f"tools: with the answer schema, {exc}") from None
    lines = grammar.splitlines()
    roots = [i for i, line in enumerate(lines) if line.startswith("root ::= ")]
    branches = re.fullmatch(r"root ::= (\S+) \| (\S+)", lines[roots[0]]) if roots else None
    if len(roots) != 1 or branches is None:  # not the converter this was written against
        raise ConstraintError("tools: the answer schema could not be combined with the calls")
    del lines[roots[0]]
    call_rule, document_rule = branches.groups()
    return "\n".join([f'root ::= "{TOOL_OPEN}" calls | {document_rule}', calls,
                      f"tool-call ::= {call_rule}", *lines])


def check_functions(functions: Sequence[Function]) -> None:
    """The refusals of tools_grammar that need no grammar built: each function's parameters
    checked for keywords the grammar could not enforce (a ConstraintError, named by index).
    Only a conversion failure or a grammar over its size cap needs the grammar itself."""
    _alternatives(functions, check_schema)


def _alternatives(functions: Sequence[Function], check: Callable[[object], object]
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each call's schema ({"name": ..., "arguments": ...}), each function's parameters
    passed to `check` on their own first (so an error names the function), and the $defs
    they share."""
    alternatives: list[dict[str, Any]] = []
    defs: dict[str, Any] = {}
    for i, function in enumerate(functions):
        try:
            parameters = _hoist_defs(function.parameters, f"f{i}-", defs)
            check({**parameters, "$defs": defs})
        except ConstraintError as exc:
            raise ConstraintError(f"tools.{i}.function.parameters: {exc}") from None
        alternatives.append({
            "type": "object",
            "properties": {"name": {"const": function.name}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False})
    return alternatives, defs


def _free_text_rules() -> str:
    """Right-linear rules for text that may end anywhere but where the marker, once
    complete, goes on into the calls: state i has matched the marker's first i chars."""
    first = TOOL_OPEN[0]
    rules = []
    for i, expected in enumerate(TOOL_OPEN):
        nxt = "calls" if i + 1 == len(TOOL_OPEN) else f"free-{i + 1}"
        alts = [f'"{expected}" {nxt}']
        if i == 0:
            alts.append(f"[^{_cls(first)}] free-0")
        else:
            alts += [f"[^{_cls(expected)}{_cls(first)}] free-0", f'"{first}" free-1']
        rules.append(f"free-{i} ::= ( " + " | ".join(alts) + " )?")
    return "\n".join(rules)


def _cls(char: str) -> str:
    return "\\" + char if char in "]^\\-" else char


def _hoist_defs(schema: Mapping[str, Any], prefix: str, defs: dict[str, Any]
                ) -> dict[str, Any]:
    """The schema with its own $defs/definitions moved into `defs` under prefixed names and
    its local references rewritten, so several functions' schemas can share one root. A
    reference elsewhere in the schema (`#/properties/a`, `#` itself) gets the part it
    points at as a def of its own: under a shared root it would point at nothing."""
    own = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    hoisted: dict[str, str] = {}  # JSON pointer -> def name

    def hoist(pointer: str) -> str | None:
        if pointer not in hoisted:
            target = _pointed(schema, pointer)
            if target is None:
                return None  # left as it is: the schema check says it points at nothing
            hoisted[pointer] = f"{prefix}at-{len(hoisted)}"  # named first: it may recur
            defs[hoisted[pointer]] = rewrite(target)
        return hoisted[pointer]

    def rewrite(node: object) -> object:
        if isinstance(node, Mapping):
            out = {k: rewrite(v) for k, v in node.items() if k not in ("$defs", "definitions")}
            ref = node.get("$ref")
            if isinstance(ref, str):
                base = next((b for b in ("#/$defs/", "#/definitions/") if ref.startswith(b)),
                            None)
                if base is not None:
                    out["$ref"] = f"#/$defs/{prefix}{ref[len(base):]}"
                elif (ref == "#" or ref.startswith("#/")) and (name := hoist(ref)):
                    out["$ref"] = f"#/$defs/{name}"
            return out
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    for name, sub in own.items():
        defs[f"{prefix}{name}"] = rewrite(sub)
    parameters = rewrite(schema)
    assert isinstance(parameters, dict)
    return parameters


def _pointed(schema: Mapping[str, Any], pointer: str) -> Any:
    """What a local JSON pointer (`#/properties/a`, `#`) names in `schema`, or None."""
    node: Any = schema
    for raw in pointer[2:].split("/") if pointer != "#" else []:
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""  # the JSON text the model wrote, as OpenAI sends it
    complete: bool = False


@dataclass(frozen=True)
class TextDelta:
    text: str
    start: int = 0  # where the text begins in the raw answer (the parser's input so far)


@dataclass(frozen=True)
class CallStart:
    index: int
    call: ToolCall


@dataclass(frozen=True)
class ArgumentsDelta:
    index: int
    text: str


Delta = TextDelta | CallStart | ArgumentsDelta


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


class ToolCallParser:
    """Splits generated text into answer text and calls as it arrives: text is passed on
    (holding back what might be the start of the marker, and whitespace that might be all
    there is before a call), a call's name as soon as it is written, its arguments piece by
    piece until their JSON closes.

    A stream cannot take back what it sent, so the whole answer reads as its stream did
    (finish): a call whose name was written stays a call, its arguments as far as they got
    when the answer was cut; a call's head before its name is complete is markup, dropped;
    and an answer cut by max_tokens shows nothing the stream held back (most likely the
    beginning of a call: the content is what had been sent).

    `json_answer`: the grammar allowed calls or a JSON document (tools_grammar with an
    answer schema), told apart by the first character; a document is content as it comes,
    nothing held back (a marker in one of its strings is text), cut or not."""

    def __init__(self, json_answer: bool = False) -> None:
        self.calls: list[ToolCall] = []
        self._buf = ""
        self._fed = 0  # characters fed so far
        self._lead = ""  # whitespace before anything shown or called, held back
        self._lead_start = 0
        self._shown = False  # whether any text was passed on
        self._state = "start" if json_answer else "text"
        self._depth = 0
        self._in_string = False
        self._escaped = False

    @property
    def consumed(self) -> int:
        """How much of the raw answer is settled: text passed on, or markup dropped (the
        rest is held back, undecided: leading whitespace, and the marker until a call's head
        follows it)."""
        held = len(self._buf) + (len(TOOL_OPEN) if self._state == "head" else 0)
        return self._fed - held - len(self._lead)

    def feed(self, text: str) -> list[Delta]:
        self._buf += text
        self._fed += len(text)
        out: list[Delta] = []
        progress = True
        while progress and self._buf:
            progress = getattr(self, f"_{self._state}")(out)
        return out

    def finish(self, cut: bool = False) -> list[Delta]:
        """What was held back, once the answer is over (all of it settled then); `cut`: by
        max_tokens."""
        out: list[Delta] = []
        if self._state == "text" and not cut and not self.calls:
            # Ended by itself with no call: a marker's beginning was text, and so is an
            # answer of whitespace only.
            self._emit_text(self._buf, self._fed - len(self._buf), out)
            if self._lead:
                out.append(TextDelta(self._lead, self._lead_start))
        # Otherwise what is held is markup cut short: a call's head before its name was
        # complete, a marker's beginning where only a call may come (after one) or where the
        # model most likely began one (cut), whitespace before it.
        self._buf, self._lead = "", ""
        return out

    def _start(self, out: list[Delta]) -> bool:
        """A JSON answer's first character: the marker's begins calls, any other a document."""
        self._state = "text" if self._buf[0] == TOOL_OPEN[0] else "document"
        return True

    def _document(self, out: list[Delta]) -> bool:
        out.append(TextDelta(self._buf, self._fed - len(self._buf)))
        self._shown = True
        self._buf = ""
        return False

    def _text(self, out: list[Delta]) -> bool:
        start = self._fed - len(self._buf)
        at = self._buf.find(TOOL_OPEN)
        if at >= 0:
            self._emit_text(self._buf[:at], start, out)
            self._buf = self._buf[at + len(TOOL_OPEN):]
            self._state = "head"
            return True
        keep = next((n for n in range(min(len(TOOL_OPEN) - 1, len(self._buf)), 0, -1)
                     if TOOL_OPEN.startswith(self._buf[-n:])), 0)
        self._emit_text(self._buf[:len(self._buf) - keep], start, out)
        self._buf = self._buf[len(self._buf) - keep:]
        return False

    def _emit_text(self, text: str, start: int, out: list[Delta]) -> None:
        """Pass on answer text that begins at `start` in the raw answer."""
        if not text:
            return
        if self.calls:
            # After a call only the separator of the next one may come: not answer text.
            if text.strip():
                out.append(TextDelta(text, start))
            return
        if not self._shown and not text.strip():
            # Perhaps all there is before a call (then no content, as whole): held until
            # text or the answer's end shows it is the answer's.
            if not self._lead:
                self._lead_start = start
            self._lead += text
            return
        if self._lead:
            text, start, self._lead = self._lead + text, self._lead_start, ""
        self._shown = True
        out.append(TextDelta(text, start))

    def _head(self, out: list[Delta]) -> bool:
        head = match_head(self._buf)
        if head is None:
            if could_begin_head(self._buf):
                return False
            # No call after all (only text without the tool grammar can hold this): the
            # marker was text.
            self._state = "text"
            self._emit_text(TOOL_OPEN, self._fed - len(self._buf) - len(TOOL_OPEN), out)
            return True
        name, end = head
        call = ToolCall(new_call_id(), name)
        self.calls.append(call)
        self._lead = ""  # whitespace before a call is no content
        out.append(CallStart(len(self.calls) - 1, call))
        self._buf = self._buf[end:]
        self._state, self._depth, self._in_string, self._escaped = "arguments", 0, False, False
        return True

    def _arguments(self, out: list[Delta]) -> bool:
        call = self.calls[-1]
        if not call.arguments:
            self._buf = self._buf.lstrip()
        end = self._scan(self._buf)
        piece = self._buf if end < 0 else self._buf[:end]
        if piece:
            call.arguments += piece
            out.append(ArgumentsDelta(len(self.calls) - 1, piece))
        if end < 0:
            self._buf = ""
            return False
        call.complete = True
        self._buf = self._buf[end:]
        self._state = "tail"
        return True

    def _scan(self, text: str) -> int:
        """Where the arguments' JSON value ends in `text` (-1: not yet), string-aware."""
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return -1

    def _tail(self, out: list[Delta]) -> bool:
        at = self._buf.find(TOOL_CLOSE)
        if at < 0:
            return False
        self._buf = self._buf[at + len(TOOL_CLOSE):]
        self._state = "text"
        return True


@dataclass
class ParsedAnswer:
    content: str | None  # None: calls and no text (as OpenAI's)
    calls: list[ToolCall] = field(default_factory=list)
    # Where the content's pieces stand in the raw answer, (start, end) each.
    shown: list[tuple[int, int]] = field(default_factory=list)


def parse_answer(text: str, cut: bool = False, json_answer: bool = False) -> ParsedAnswer:
    """A finished answer's text and calls (`cut`: by max_tokens), as its stream shows them
    (ToolCallParser, `json_answer` as there): a call cut short in its arguments is a call
    with arguments as far as they got."""
    parser = ToolCallParser(json_answer)
    deltas = parser.feed(text) + parser.finish(cut)
    texts = [d for d in deltas if isinstance(d, TextDelta)]
    content = "".join(d.text for d in texts)
    return ParsedAnswer(content or (None if parser.calls else ""), parser.calls,
                        [(d.start, d.start + len(d.text)) for d in texts])
