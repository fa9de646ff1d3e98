"""``query --where``: our own grammar, evaluated with numpy, never executed as code."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import store_path  # noqa: F401  (the module's store fixture)

from scarletstore.cli import main
from scarletstore.errors import InputError
from scarletstore.store.query import blend_table, select, where_mask

# six blends chosen so that each operator and precedence rule changes the selection
TABLE = pd.DataFrame({
    "parent": [1, 2, 3, 4, 5, 6],
    "n_sources": [1, 2, 3, 4, 5, 2],
    "iterations": [0, 48, 300, 0, 12, 7],
    "log_likelihood": [np.nan, -9011.0, -3.5e2, np.nan, -1e-3, -7.25],
    "converged": [False, True, False, False, True, True],
    "reason": ["isolated", "", "", "too_many_peaks", "", "failed: ValueError"],
})


def parents(where):
    return TABLE["parent"][where_mask(TABLE, where)].tolist()


@pytest.mark.parametrize("where,expected", [
    ("converged", [2, 5, 6]),
    ("not converged", [1, 3, 4]),
    ("converged == False", [1, 3, 4]),
    ("n_sources > 2", [3, 4, 5]),
    ("n_sources >= 2 and n_sources <= 3", [2, 3, 6]),
    ("1 < n_sources <= 3", [2, 3, 6]),          # chained like Python
    ("n_sources != 2", [1, 3, 4, 5]),
    ("iterations == 300", [3]),
    # not binds tighter than and, and tighter than or
    ("not converged and n_sources > 2", [3, 4]),
    ("not (converged and n_sources > 2)", [1, 2, 3, 4, 6]),
    ("converged or n_sources == 1 and iterations > 0", [2, 5, 6]),
    ("(converged or n_sources == 1) and iterations > 0", [2, 5, 6]),
    ("(converged or n_sources == 1) and not iterations > 10", [1, 6]),
    ("((n_sources == 1) or ((n_sources == 4)))", [1, 4]),
    ("not not converged", [2, 5, 6]),
    # numbers: ints, decimals, scientific, signed
    ("log_likelihood > -1e3", [3, 5, 6]),
    ("log_likelihood < -3.5E+2", [2]),
    ("log_likelihood >= -.001", [5]),
    ("log_likelihood == -9011", [2]),
    ("log_likelihood > -1e9 or log_likelihood <= -1e9", [2, 3, 5, 6]),  # NaN matches neither
    # in / not in, brackets or parentheses, trailing comma
    ("n_sources in [1, 4]", [1, 4]),
    ("n_sources in (2,)", [2, 6]),
    ("n_sources not in [1, 2, 3]", [4, 5]),
    ("reason in ['isolated', 'too_many_peaks']", [1, 4]),
    ("reason not in ('',)", [1, 4, 6]),
    # strings, either quote, with an escaped quote
    ("reason == 'isolated'", [1]),
    ('reason == ""', [2, 3, 5]),
    ("reason != '' and not reason == 'isolated'", [4, 6]),
    ("reason == 'it\\'s'", []),
    ("True", [1, 2, 3, 4, 5, 6]),
    ("False or converged", [2, 5, 6]),
    ("n_sources == 99999999999999999999", []),      # beyond int64: compared as a float
    ("  converged\n and n_sources>4 ", [5]),
])
def test_grammar_selects_the_right_rows(where, expected):
    assert parents(where) == expected


# ------------------------------------------------------------- refused input
PROBLEMS = [
    ("@pd.io.common.os.system('id')", "'@' variables are not allowed"),
    ("reason.to_csv('x')", "attribute access"),
    ("__import__('os').system('id')", "function calls are not allowed"),
    ("lambda: 1", "the Python keyword 'lambda' is not allowed"),
    ("converged is True", "unexpected 'is' after a complete condition"),
    ("n_sources > 1; import os", "unexpected character ';'"),
    ("`reason` == ''", "backtick"),
    ("n_sources[0] > 1", "subscripts are not allowed"),
    ("len(reason) > 1", "function calls are not allowed"),
    ("colour > 1", "unknown column 'colour'"),
    ("n_sources > 1 garbage", "unexpected 'garbage' after a complete condition"),
    ("n_sources > 1)", "unexpected ')'"),
    ("(n_sources > 1", "expected ')'"),
    ("n_sources >", "ends too early"),
    ("n_sources", "column 'n_sources' is not a condition"),
    ("converged and iterations", "column 'iterations' is not a condition"),
    ("n_sources = 2", "use '=='"),
    ("n_sources & 1", "use 'and'"),
    ("n_sources + 1 > 2", "arithmetic is not allowed"),
    ("-n_sources < 0", "'-' must be followed by a number"),
    ("reason == 3", "cannot compare column 'reason' (text) with number"),
    ("n_sources == 'two'", "cannot compare column 'n_sources' (number) with text"),
    ("n_sources in 3", "'in' needs a list"),
    ("n_sources in []", "at least one value"),
    ("n_sources in [1, n_peaks]", "expected a column, number, string or True/False"),
    ("reason == 'open", "unterminated string"),
    ("", "empty condition"),
    ("(" * 200 + "converged" + ")" * 200, "nested more than"),
    ("not " * 200 + "converged", "nested more than"),
]


@pytest.mark.parametrize("where,problem", PROBLEMS)
def test_outside_the_grammar_is_refused_with_the_problem(where, problem):
    with pytest.raises(InputError, match=None) as info:
        where_mask(TABLE, where)
    message = str(info.value)
    assert problem in message and "\n" not in message, message


def _payloads(target):
    """Expressions that ran code through pandas' query (each would create ``target``)."""
    t = str(target)
    return [
        f"@pd.io.common.os.system('touch {t}') == 0",
        f"n_sources > 0 and @pd.io.common.os.system('touch {t}') == 0",
        f"@np.save('{t}', 1)",
        f"reason.to_csv('{t}')",
        f"reason.str.len() > 0 and reason.to_csv('{t}') is None",
        f"__import__('os').system('touch {t}') == 0",
        f"(lambda: __import__('os').system('touch {t}'))() == 0",
        f"`reason`.to_csv('{t}')",
        f"n_sources.__class__.__init__.__globals__['os'].system('touch {t}')",
        f"open('{t}', 'w')",
    ]


@pytest.mark.parametrize("k", range(10))
def test_code_payloads_are_refused_and_never_run(store_path, tmp_path, capsys, k):  # noqa: F811
    target = tmp_path / "pwned"
    where = _payloads(target)[k]
    assert main(["query", str(store_path), "--where", where]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "--where" in err and "not allowed" in err, err
    assert not target.exists() and not target.with_suffix(".npy").exists()
    assert not list(tmp_path.iterdir())


def test_cli_where_selects_blends_of_the_store(store_path, capsys):  # noqa: F811
    # the fixture's runs: blend 1 converged, blend 2 not, parent 3 isolated (no fit)
    assert main(["query", str(store_path), "--run", "a", "--where", "not converged and reason == ''"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines[1:]] == ["2"]
    assert main(["query", str(store_path), "--run", "a", "--where",
                 "reason in ['isolated'] or (converged and iterations < 21)"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines[1:]] == ["1", "3"]


def test_select_combines_blend_and_where(store_path):  # noqa: F811
    from scarletstore.store.store import Store

    table = blend_table(Store(store_path), "a")
    assert select(table, blend=2, where="not converged")["parent"].tolist() == [2]
    assert select(table, blend=1, where="not converged").empty


# --------------------------------------------- the grammar agrees with Python
# Random expressions of the grammar, evaluated by our parser on the whole
# table and by Python itself row by row (the test trusts its own generated
# text; the library never evaluates anything).
_NUMERIC = ["n_sources", "iterations", "log_likelihood"]
_numbers = st.sampled_from(["0", "2", "3", "-7.25", "1e1", "300", "-9011", "4.0"])
_strings = st.sampled_from(["''", "'isolated'", '"too_many_peaks"', "'x'"])
_ops = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])


@st.composite
def _comparison(draw):
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return f"{draw(st.sampled_from(_NUMERIC))} {draw(_ops)} {draw(_numbers)}"
    if kind == 1:
        return f"reason {draw(st.sampled_from(['==', '!=']))} {draw(_strings)}"
    if kind == 2:
        items = draw(st.lists(_numbers, min_size=1, max_size=3))
        neg = draw(st.sampled_from(["in", "not in"]))
        return f"{draw(st.sampled_from(_NUMERIC))} {neg} [{', '.join(items)}]"
    if kind == 3:
        return f"{draw(_numbers)} {draw(_ops)} {draw(st.sampled_from(_NUMERIC))} {draw(_ops)} {draw(_numbers)}"
    return draw(st.sampled_from(["converged", "True", "False"]))


_conditions = st.recursive(
    _comparison(),
    lambda inner: st.one_of(
        st.builds(lambda a, b: f"{a} and {b}", inner, inner),
        st.builds(lambda a, b: f"{a} or {b}", inner, inner),
        st.builds(lambda a: f"not {a}", inner),
        st.builds(lambda a: f"({a})", inner)),
    max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(_conditions)
def test_random_conditions_agree_with_python_semantics(where):
    rows = TABLE.to_dict("records")
    expected = [bool(eval(where, {"__builtins__": {}}, row)) for row in rows]  # noqa: S307
    assert where_mask(TABLE, where).tolist() == expected, where
