"""Arguments whose object holds two keys that are one name but for case or compatibility forms.

Many tools read argument names without case (ASP.NET's model binding, System.Text.Json or Jackson
set case-insensitive, HTTP header maps), some after NFKC folding: to them `force` and `FORCE`, or
`limit` and a fullwidth `ｌｉｍｉｔ`, are one argument, and which of the two values they run with
(the first, the last, both joined) is theirs to choose. Policy decided on `force: false` and the
tool could run with `FORCE: true`. Such a call is denied before policy on every front door
(`invalid_arguments`, naming the object and both keys, never a value) and recorded.
"""

from __future__ import annotations

import pytest

from sidecar.calls import ToolCall, check_call
from sidecar.client import AsyncClient
from tests.infra.invoke import records

COLLIDING = [
    ({"force": False, "FORCE": True}, 'arguments has the keys "FORCE" and "force"'),
    ({"opts": {"Recursive": True, "recursive": False}}, 'arguments.opts has the keys "Recursive" and "recursive"'),
    ({"rows": [{"id": 1}, {"ID": 2, "id": 3}]}, 'arguments.rows[1] has the keys "ID" and "id"'),
    ({"limit": 3, "\uff4c\uff49\uff4d\uff49\uff54": 1000}, 'arguments has the keys "limit" and "\\uff4c'),  # fullwidth
    ({"Strasse": 1, "stra\u00dfe": 2}, 'arguments has the keys "Strasse" and "stra\\u00dfe"'),  # ß folds to ss
    ({"\u212aey": 1, "key": 2}, 'arguments has the keys "key" and "\\u212aey"'),  # KELVIN SIGN
    ({"caf\u00e9": 1, "cafe\u0301": 2}, 'arguments has the keys "cafe\\u0301" and "caf\\u00e9"'),  # NFD, NFC
    ({"headers": {"Content-Type": "a", "content-type": "b"}}, 'arguments.headers has the keys'),
    ({"a b": [[{"X": 1, "x": 2}]]}, 'arguments["a b"][0][0] has the keys "X" and "x"'),
]


@pytest.mark.parametrize("arguments, where", COLLIDING, ids=[repr(a) for a, _ in COLLIDING])
def test_two_spellings_of_one_name_are_refused_naming_where(arguments, where):
    problems, _ = check_call(ToolCall("echo", arguments), max_bytes=1 << 20, max_depth=64)
    assert [p for p in problems if p.startswith(f"invalid_arguments: {where}")], problems


@pytest.mark.parametrize("arguments", [
    {"force": True, "Force2": False},
    {"opts": {"force": 1}, "OPTS2": {"FORCE": 2}},  # one spelling in each object
    {"FORCE": "force", "list": ["Force", "FORCE"]},  # values are not names
    {"\ufb01le": 1},  # a ligature alone is one name
    {"Ab": {"ab": 1}},  # another level
])
def test_one_spelling_per_name_is_not_refused(arguments):
    problems, _ = check_call(ToolCall("echo", arguments), max_bytes=1 << 20, max_depth=64)
    assert problems == []


async def test_the_served_sidecar_denies_and_records_it_without_asking_policy(sidecar, tmp_path):
    async with AsyncClient(sidecar.addresses[0]) as client:
        result = await client.authorize("read_file", {"path": "/workspace/a.txt", "PATH": "/etc/shadow"})
    assert result.outcome == "deny"
    assert result.reasons[0].startswith('invalid_arguments: arguments has the keys "PATH" and "path"'), result
    assert "/etc/shadow" not in " ".join(result.reasons)
    [record] = [r for r in records(tmp_path / "evidence") if r.get("decision_id") == result.decision_id]
    assert record["outcome"] == "deny" and record["reasons"] == list(result.reasons)
