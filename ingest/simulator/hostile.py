"""Hostile events: hand-written JSON texts that stress every layer between the wire and a
PostgreSQL row (control characters, backslashes, JSON escapes, surrogates, huge strings,
deep nesting, numbers no double holds). Switched on by `SimulatorConfig.hostile_events`.

Each kind says whether PostgreSQL can store it. Storable kinds keep the event's id and
timestamp (they are part of the truth); unstorable ones are counted as such.
The JSON texts are written by hand, not by a serialiser, so that escapes the client must
decode (`\\/`, `\\u00e9`, surrogate pairs) really appear on the wire.
"""

from __future__ import annotations

import json
from typing import Any

CONTROLS = "".join(chr(c) for c in (*range(1, 0x20), 0x7F, *range(0x80, 0xA0)))
EMOJI = "\U0001f600\U0001f469\u200d\U0001f4bb\U0001f1eb\U0001f1f7 \u202e\u2028\u2029\ufeff\uffff\U0010ffff"


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _event(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**base, **changes}


def _nest(depth: int) -> str:
    return '{"d":' * depth + "1" + "}" * depth


# kind -> (storable, builder(base event dict) -> JSON text). The base carries `id`, the
# session fields and an epoch-ms `timestamp`.
def _controls(b: dict[str, Any]) -> str:
    return _dumps(_event(b, name=CONTROLS, type="\t\n\r", properties={CONTROLS: CONTROLS, "k\tey\n": "\\N"}))


def _backslashes(b: dict[str, Any]) -> str:
    text = '\\ \\\\ \\N \\n \\t \\r \\. " \\" \'\' \\u0041 \\x00 end\\'
    return _dumps(_event(b, type="\\N", name=text, userId="\\", properties={"q": text, "\\N": None}))


def _json_escapes(b: dict[str, Any]) -> str:
    head = _dumps(_event(b, name="PLACEHOLDER", properties={"p": "PLACEHOLDER2"}))
    escaped = '"\\u00e9\\/\\b\\f\\n\\r\\t\\"\\\\\\u0041\\u2028\\u0001\\u007f\\ud83d\\ude00"'
    return head.replace('"PLACEHOLDER"', escaped).replace('"PLACEHOLDER2"', escaped)


def _emoji(b: dict[str, Any]) -> str:
    return _dumps(_event(b, name=EMOJI, type=EMOJI[:3], properties={EMOJI: [EMOJI, "\u0301e\u0301"]}))


def _megabyte(b: dict[str, Any]) -> str:
    big = ("x\\\t\u00e9\U0001f600" * 200_000)[: 1 << 20]
    return _dumps(_event(b, name=big[:100_000], properties={"blob": big}))


def _deep(b: dict[str, Any]) -> str:
    head = _dumps(_event(b, properties="PLACEHOLDER"))
    return head.replace('"PLACEHOLDER"', _nest(3000))


def _numbers(b: dict[str, Any]) -> str:
    head = _dumps(_event(b, properties="PLACEHOLDER"))
    numbers = (
        '{"huge":1e400,"tiny":1e-400,"neg":-1.5E+308,"u64":18446744073709551616,'
        '"i64min":-9223372036854775809,"long":123456789012345678901234567890123456789,'
        '"precise":0.1000000000000000055511151231257827021181583404541015625,'
        '"negzero":-0.0,"exp":1E+2,"list":[1e309,-1e309,4.9e-324]}'
    )
    return head.replace('"PLACEHOLDER"', numbers)


def _nul_escape(b: dict[str, Any]) -> str:
    return _dumps(_event(b, name="PLACEHOLDER")).replace('"PLACEHOLDER"', '"before\\u0000after"')


def _lone_surrogate(b: dict[str, Any]) -> str:
    return _dumps(_event(b, name="PLACEHOLDER")).replace('"PLACEHOLDER"', '"high\\ud800 alone"')


def _lone_surrogate_key(b: dict[str, Any]) -> str:
    return _dumps(_event(b, properties="PLACEHOLDER")).replace('"PLACEHOLDER"', '{"\\udfff":1}')


def _numeric_overflow(b: dict[str, Any]) -> str:
    # Beyond what PostgreSQL's numeric (and so jsonb) can hold: 10^200000.
    return _dumps(_event(b, properties="PLACEHOLDER")).replace('"PLACEHOLDER"', '{"n":1e200000}')


HOSTILE_KINDS: dict[str, tuple[bool, Any]] = {
    "controls": (True, _controls),
    "backslashes": (True, _backslashes),
    "json_escapes": (True, _json_escapes),
    "emoji": (True, _emoji),
    "megabyte": (True, _megabyte),
    "deep": (True, _deep),
    "numbers": (True, _numbers),
    "nul_escape": (False, _nul_escape),
    "lone_surrogate": (False, _lone_surrogate),
    "lone_surrogate_key": (False, _lone_surrogate_key),
    "numeric_overflow": (False, _numeric_overflow),
}


def hostile_json(kind: str, base: dict[str, Any]) -> str:
    return str(HOSTILE_KINDS[kind][1](base))


def storable(kind: str) -> bool:
    return HOSTILE_KINDS[kind][0]
