"""The Grafana dashboard and the alerting rules in config/ are built on
metrics the server exports.

A stock client commits, loads and packs against zeotemp (so that every
family has samples, the class table included); then every query of every
panel of ``config/grafana-dashboard.json`` and every rule of
``config/prometheus-alerts.yml`` must name only metric families that the
scrape holds, every label it groups or filters by must be a label those
families carry (``instance`` and ``job`` are Prometheus's own), and every
label value it matches must be one the server exports. A renamed metric, a
typo in a query, a label or a reason that is not there fails.
"""

import json
import re
import urllib.request
from pathlib import Path

import pytest
import transaction
from persistent.mapping import PersistentMapping

from zeotemp_testobjects import Item

CONFIG = Path(__file__).resolve().parent.parent.parent / "config"
DASHBOARD = CONFIG / "grafana-dashboard.json"
ALERTS = CONFIG / "prometheus-alerts.yml"

# PromQL words that are not metric names (functions, aggregations,
# operators' keywords) that this dashboard may use.
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "topk", "bottomk", "rate", "irate",
    "increase", "delta", "by", "without", "on", "ignoring", "group_left",
    "group_right", "and", "or", "unless", "offset", "bool", "histogram_quantile",
    "label_values", "clamp_min", "clamp_max", "abs", "time", "vector",
}
PROMETHEUS_LABELS = {"instance", "job"}
# Series Prometheus makes itself for every target.
PROMETHEUS_SERIES = {"up"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{([^}]*)\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_WORD = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr):
    """The metric names an expression selects (not functions or labels)."""
    body = _MATCHERS.sub("", _STRING.sub('""', expr))
    body = _GROUPING.sub("", _RANGE.sub("", body))
    names = set()
    for m in _WORD.finditer(body):
        word, rest = m.group(0), body[m.end():].lstrip()
        if word in PROMQL_WORDS or rest.startswith("("):
            continue
        names.add(word)
    return names


def label_names(expr):
    """Labels an expression filters on or groups by."""
    labels = set()
    for m in _MATCHERS.finditer(_STRING.sub('""', expr)):
        for matcher in m.group(1).split(","):
            name = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)", matcher)
            if name:
                labels.add(name.group(1))
    for m in _GROUPING.finditer(expr):
        labels.update(x.strip() for x in m.group(1).split(",") if x.strip())
    return labels


def label_values(expr):
    """(label, value) pairs an expression matches exactly (`=`, or each
    alternative of a `=~` made only of plain alternatives)."""
    pairs = set()
    for m in re.finditer(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|=)\s*"([^"]*)"', expr):
        label, op, value = m.groups()
        if "$" in value:  # a dashboard variable
            continue
        if op == "=":
            pairs.add((label, value))
        elif re.fullmatch(r"[A-Za-z0-9_.-]+(\|[A-Za-z0-9_.-]+)*", value):
            pairs.update((label, v) for v in value.split("|"))
    return pairs


def parse_scrape(text):
    """{family: {label: set of values seen on its samples}}."""
    families = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            families.setdefault(line.split()[2], {})
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s", line)
        assert m, line
        name = m.group(1)
        family = name if name in families else re.sub(
            r"_(bucket|sum|count)$", "", name)
        assert family in families, f"a sample without # TYPE: {line}"
        for label, value in re.findall(
                r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"',
                m.group(3) or ""):
            families[family].setdefault(label, set()).add(value)
    return families


def alert_rules():
    """(alert name, expr) of config/prometheus-alerts.yml (one-line exprs)."""
    rules, name = [], None
    for line in ALERTS.read_text().splitlines():
        m = re.match(r"\s*- alert:\s*(\S+)", line)
        if m:
            name = m.group(1)
        m = re.match(r"\s*expr:\s*(.+)$", line)
        if m:
            assert name, line
            rules.append((f"alert {name}", m.group(1)))
            name = None
    return rules


def queries(dashboard):
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    for var in dashboard.get("templating", {}).get("list", []):
        q = var.get("definition")
        if q:
            inner = re.match(r"label_values\((.*),\s*\w+\)$", q)
            out.append((f"variable {var['name']}", inner.group(1) if inner else q))
    return out


def test_the_checker_catches_what_it_should():
    # The parsing this test relies on, on expressions like the dashboard's.
    assert metric_names(
        'sum by (storage, reason) (rate(zeotemp_votes_refused_total'
        '{instance=~"$instance"}[$__rate_interval]))') == {
            "zeotemp_votes_refused_total"}
    assert label_names('sum by (storage) (x{instance=~"a,b", job="z"})') == {
        "storage", "instance", "job"}
    assert metric_names("max(process_open_fds) / max(process_max_fds)") == {
        "process_open_fds", "process_max_fds"}
    families = parse_scrape(
        "# TYPE a_total counter\na_total{reason=\"x\",s=\"a\\\"b\"} 1\n")
    assert families == {"a_total": {"reason": {"x"}, "s": {'a\\"b'}}}
    assert label_values('x{reason=~"a|b-c", instance=~"$instance"}') == {
        ("reason", "a"), ("reason", "b-c")}
    assert label_values('x{job="zeotemp", r=~"a.*"}') == {("job", "zeotemp")}
    assert len(alert_rules()) >= 8


@pytest.mark.zeotemp_only(reason="the Prometheus endpoint")
def test_every_dashboard_query_names_an_exported_metric(server_factory,
                                                        make_db):
    dashboard = json.loads(DASHBOARD.read_text())
    srv = server_factory(zeotemp_args=("--metrics-address", "127.0.0.1:0"))
    url = re.search(r"metrics on (http://\S+/metrics)",
                    srv.log_text()).group(1)
    db = make_db(srv)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    tm.begin()
    conn.root()["m"] = PersistentMapping({i: Item(i) for i in range(20)})
    tm.commit()
    conn.close()
    db.pack()
    with urllib.request.urlopen(url, timeout=10) as r:
        families = parse_scrape(r.read().decode())

    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for what in ("commits", "loads", "conflicts", "memory vs limit",
                 "objects", "gc pauses", "connections", "refusals"):
        assert what in titles, f"no panel for {what}: {titles}"

    checked = 0
    for where, expr in queries(dashboard) + alert_rules():
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        for name in names - PROMETHEUS_SERIES:
            assert name in families, (
                f"{where}: {name} is not exported (query {expr!r})")
            labels = families[name]
            missing = label_names(expr) - set(labels) - PROMETHEUS_LABELS
            assert not missing, (
                f"{where}: {name} has no label {sorted(missing)} "
                f"(it has {sorted(labels)}; query {expr!r})")
            for label, value in label_values(expr):
                if label in PROMETHEUS_LABELS:
                    continue
                assert value in labels.get(label, ()), (
                    f"{where}: {name} has no {label}={value!r} "
                    f"(it has {sorted(labels.get(label, ()))}; query {expr!r})")
            checked += 1
    assert checked >= 30
