"""examples/grafana/vllm-mux.json: a dashboard whose every query names a
series the router exports.

The router runs in front of a fake vLLM server (test_router's) with a real
daemon in this process that knows two models, one awake and one asleep; a
request goes through it, and the series its /metrics then has are what the
dashboard's PromQL may name. No vLLM, no model: fast.
"""

import json
import os
import re
import tempfile
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_router import FakeVllm, Served

from conftest import LiveDaemon
from vllm_mux.router import METRICS, make_app

DASHBOARD = Path(__file__).parent.parent / "examples" / "grafana" / "vllm-mux.json"
CS = 64 << 10

# -- what a PromQL expression queries --

_TOKEN = re.compile(
    r"""
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<variable>\$\{[^}]*\}|\$\w+|\[\[\w+\]\])     # Grafana's template variables
    | (?P<range>\[[^\]]*\])                          # [5m], [$__rate_interval], [1h:5m]
    | (?P<duration>(?:\d+(?:ms|[smhdwy]))+\b)         # offset 5m
    | (?P<number>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<open>[({])
    | (?P<close>[)}])
    | (?P<other>[^\sA-Za-z0-9_:"'`$(){}\[\]]+|\s+)   # operators, commas, spaces
    """,
    re.VERBOSE,
)
# Words that are never a metric (those followed by "(" are functions anyway).
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
             "or", "unless", "offset", "atan2", "inf", "nan", "start", "end"}  # fmt: skip
# After these, a parenthesised list holds label names, not expressions.
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_RANGE_FUNCTIONS = {"rate", "irate", "increase", "delta", "idelta", "deriv", "resets"}


def queried(expr: str) -> list[tuple[str, tuple[str, ...]]]:
    """Each metric ``expr`` selects, with the functions around it (innermost
    last): ``histogram_quantile(0.9, sum by (le) (rate(a_bucket{x="y"}[5m])))``
    is ``[("a_bucket", ("histogram_quantile", "sum", "rate"))]``. Label names
    and values, groupings, durations, numbers and template variables are not
    metrics; ``{__name__="m"}`` names ``m``."""
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    assert "".join(text for _, text in tokens) == expr, f"cannot read {expr!r}"
    tokens = [(kind, text) for kind, text in tokens if not text.isspace()]
    found, stack = [], []  # stack: each open "(" or "{" with what it belongs to
    aggregation, closed = "", ""  # the last "sum by", what the last ")" closed
    for i, (kind, text) in enumerate(tokens):
        after = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "name" and after in _GROUPING:
            aggregation = text  # sum by (le) (...): the second "(" is sum's
        if kind == "open":
            before = tokens[i - 1] if i else ("", "")
            if text == "{":
                stack.append("{")
            elif before[0] == "name" and before[1] in _GROUPING:
                stack.append("labels")
            elif before[0] == "name":
                stack.append(before[1])
            else:
                stack.append(aggregation if before[1] == ")" and closed == "labels" else "")
        elif kind == "close":
            closed = stack.pop()
        elif stack and stack[-1] in ("{", "labels"):
            # Inside braces, only __name__="m" names a metric.
            if text == "__name__" and after == "=" and tokens[i + 2][0] == "string":
                found.append((tokens[i + 2][1][1:-1], tuple(f for f in stack if f != "{")))
        elif kind == "name" and after not in ("(", *_GROUPING) and text not in _KEYWORDS:
            found.append((text, tuple(f for f in stack if f)))
    assert not stack, f"unbalanced {expr!r}"
    return found


def queried_names(expr: str) -> set[str]:
    return {name for name, _ in queried(expr)}


def labels_used(expr: str) -> list[tuple[str, str]]:
    """(metric, label) for each label name that a selector of ``expr`` uses on
    its metric (``m{model="a"}``), or a ``by``/``without`` clause on the
    metrics it aggregates (``sum by (model) (m)``, ``sum (m) by (model)``)."""
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    tokens = [(kind, text) for kind, text in tokens if not text.isspace()]
    depth = {"open": 1, "close": -1}

    def matching(i: int, step: int) -> int:
        """The bracket that closes (step 1) or opens (step -1) the one at ``i``."""
        level = 0
        while True:
            level += depth.get(tokens[i][0], 0) * step
            if level == 0:
                return i
            i += step

    def names(i: int, j: int) -> set[str]:
        return queried_names(" ".join(text for _, text in tokens[i : j + 1]))

    found = []
    for i, (kind, text) in enumerate(tokens):
        after = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "name" and after == "{" and text not in _GROUPING:
            for k in range(i + 2, matching(i + 1, 1)):
                if tokens[k][0] == "name" and tokens[k + 1][1] in ("=", "!=", "=~", "!~"):
                    found.append((text, tokens[k][1]))
        elif kind == "name" and text in ("by", "without"):
            end = matching(i + 1, 1)
            labels = [t for k, t in tokens[i + 2 : end] if k == "name"]
            if end + 1 < len(tokens) and tokens[end + 1][1] == "(":  # sum by (l) (m)
                aggregated = names(end + 1, matching(end + 1, 1))
            else:  # sum (m) by (l)
                aggregated = names(matching(i - 1, -1), i - 1)
            found += [(name, label) for name in sorted(aggregated) for label in labels]
    return found


# -- the dashboard --


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def exprs(board: dict) -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel, rows' panels included."""
    panels = [*board["panels"]]
    for p in board["panels"]:
        panels += p.get("panels", [])
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


def variable_queries(board: dict) -> list[tuple[str, str]]:
    """(series selector, label) of each ``label_values(selector, label)`` variable."""
    out = []
    for v in board["templating"]["list"]:
        if v["type"] == "query":
            query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query)
            assert m, f"variable {v['name']}: {query!r}"
            out.append((m.group(1), m.group(2)))
    return out


# -- what the router exports --


@pytest.fixture(scope="module")
def scraped():
    """The router's /metrics, once a request has gone through it and the
    daemon knows an awake and an asleep model (so that wakes, sleeps and both
    histograms have samples)."""
    d = LiveDaemon(os.path.join(tempfile.mkdtemp(prefix="vmux"), "d.sock"), 8, CS)
    alpha, beta = d.client(), d.client()
    alpha.hello("alpha")
    ids, fds = alpha.lease(2)
    for fd in fds:
        os.close(fd)
    alpha.set_state("waking")
    alpha.set_state("awake", wake={"seconds": 0.25})
    beta.hello("beta")
    beta.set_state("asleep", sleep={"seconds": 0.1})
    fakes = {"alpha": FakeVllm("alpha"), "beta": FakeVllm("beta")}
    router = Served(make_app({m: f.url for m, f in fakes.items()}, daemon_socket=d.path))
    try:
        body = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"{router.url}/v1/chat/completions", json=body).status_code == 200
        return httpx.get(f"{router.url}/metrics").text
    finally:
        router.stop()
        for fake in fakes.values():
            fake.served.stop()
        alpha.release(ids)
        d.stop()


@pytest.fixture(scope="module")
def exported(scraped):
    """{sample name: its family's type}."""
    return {s.name: f.type for f in text_string_to_metric_families(scraped) for s in f.samples}


@pytest.fixture(scope="module")
def labelled(scraped):
    """{sample name: the label names its samples have}."""
    out = {}
    for family in text_string_to_metric_families(scraped):
        for s in family.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def mislabelled(expr: str, labelled: dict) -> list[str]:
    """The labels ``expr`` uses on an exported metric that has no such label."""
    return [
        f"{name}: no label {label}"
        for name, label in labels_used(expr)
        if name in labelled and label not in labelled[name] | {"__name__"}
    ]


def unexported(expr: str, exported: dict) -> list[str]:
    """What is wrong with the metrics ``expr`` queries: a series the router
    does not export, one missing from metrics.METRICS (the README's table), or
    a gauge under rate() and the like (only counters and buckets)."""
    documented = {name: kind for name, kind, *_ in METRICS}
    problems = []
    for name, functions in queried(expr):
        if name not in exported:
            problems.append(f"{name}: not exported by the router")
            continue
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if documented.get(name) is None and documented.get(base) != "histogram":
            problems.append(f"{name}: not in metrics.METRICS")
        if _RANGE_FUNCTIONS & set(functions) and exported[name] not in ("counter", "histogram"):
            problems.append(f"{name}: a {exported[name]} under {'/'.join(functions)}")
    return problems


# -- tests --


def test_the_tokenizer_finds_metrics_and_nothing_else():
    assert queried(
        "histogram_quantile(0.95, sum by (le, model) (rate(vllm_mux:wake_latency_seconds_bucket"
        '{model=~"$model", state!="a:b"}[$__rate_interval])))'
    ) == [("vllm_mux:wake_latency_seconds_bucket", ("histogram_quantile", "sum", "rate"))]
    assert queried_names(
        "60 * sum without (instance) (increase(a:b_total[5m] offset 1h30m)) / on (model) "
        'group_left (state) c_d > bool 1e3 and e unless f{x="y"} or max(${ds}) - [[old]]'
    ) == {"a:b_total", "c_d", "e", "f"}
    assert queried_names('count({__name__="vllm_mux:daemon_up"}) + sum(rate(x[1h:5m]))') == {
        "vllm_mux:daemon_up",
        "x",
    }
    assert queried_names("1 - vllm_mux:pool_bytes_free / vllm_mux:pool_bytes_total") == {
        "vllm_mux:pool_bytes_free",
        "vllm_mux:pool_bytes_total",
    }


def test_the_dashboard_is_an_importable_dashboard():
    board = dashboard()
    assert board["title"] and board["uid"] and board["schemaVersion"] >= 39
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["definition"] == "label_values(vllm_mux:model_state, model)"
    assert variables["model"]["includeAll"] and variables["model"]["allValue"] == ".*"
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids), ids
    for p in panels:
        assert p["type"] in ("timeseries", "stat", "bargauge") and p["title"], p
        grid = p["gridPos"]
        assert all(isinstance(grid[k], int) for k in "xywh"), p["title"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(set(refs)) == len(refs), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"] == p["datasource"], p["title"]
            if "_bucket" in t["expr"]:  # a quantile over the buckets' rates, by le
                assert re.match(r"histogram_quantile\(0\.\d+, sum by \(le, ", t["expr"]), t
    # No two panels overlap.
    cells = [(p["gridPos"]["x"] + dx, p["gridPos"]["y"] + dy) for p in panels
             for dx in range(p["gridPos"]["w"]) for dy in range(p["gridPos"]["h"])]  # fmt: skip
    assert len(cells) == len(set(cells))


def test_every_queried_metric_is_one_the_router_exports(exported, labelled):
    board = dashboard()
    problems = [
        f"{title}: {problem}"
        for title, expr in exprs(board)
        for problem in unexported(expr, exported) + mislabelled(expr, labelled)
    ]
    for query, label in variable_queries(board):
        problems += unexported(query, exported) + mislabelled(query, labelled)
        problems += [f"{n}: no label {label}" for n in queried_names(query)
                     if label not in labelled.get(n, ())]  # fmt: skip
    assert problems == []
    # What the issue asks the dashboard to show is there.
    shown = {name for _, expr in exprs(board) for name in queried_names(expr)}
    assert {
        "vllm_mux:wakes_total",
        "vllm_mux:wake_latency_seconds_bucket",
        "vllm_mux:time_to_first_token_seconds_bucket",
        "vllm_mux:request_queue_length",
        "vllm_mux:instance_bytes",
        "vllm_mux:pool_bytes_total",
    } <= shown


def test_a_metric_the_router_does_not_export_is_caught(exported):
    assert unexported("rate(vllm_mux:wakes_total[5m])", exported) == []
    assert unexported('sum(rate(vllm_mux:made_up_total{model="a"}[5m]))', exported) == [
        "vllm_mux:made_up_total: not exported by the router"
    ]
    # Near misses: a counter without _total, a histogram without its suffix.
    assert unexported("vllm_mux:wakes + vllm_mux:wake_latency_seconds", exported) == [
        "vllm_mux:wakes: not exported by the router",
        "vllm_mux:wake_latency_seconds: not exported by the router",
    ]
    # Exported, but not in the README's table.
    assert unexported("vllm_mux:extra", {**exported, "vllm_mux:extra": "gauge"}) == [
        "vllm_mux:extra: not in metrics.METRICS"
    ]
    assert unexported("rate(vllm_mux:instance_bytes[5m])", exported) == [
        "vllm_mux:instance_bytes: a gauge under rate"
    ]


def test_a_label_the_metric_does_not_have_is_caught(labelled):
    ok = ('histogram_quantile(0.9, sum by (le, model) (rate(vllm_mux:wake_latency_seconds_bucket'
          '{model=~"$model"}[5m])))')  # fmt: skip
    assert mislabelled(ok, labelled) == []
    assert mislabelled('vllm_mux:wakes_total{modle="a", model!="b"}', labelled) == [
        "vllm_mux:wakes_total: no label modle"
    ]
    assert mislabelled("sum by (modle) (rate(vllm_mux:wakes_total[5m]))", labelled) == [
        "vllm_mux:wakes_total: no label modle"
    ]
    assert mislabelled("sum (vllm_mux:instance_bytes) without (modle)", labelled) == [
        "vllm_mux:instance_bytes: no label modle"
    ]
    assert mislabelled("max by (model) (vllm_mux:daemon_up)", labelled) == [
        "vllm_mux:daemon_up: no label model"
    ]
