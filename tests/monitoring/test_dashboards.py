"""Grafana dashboards as code: committed JSON is fresh, panels are complete, every expression is valid PromQL
over metrics that exist (monitoring.metrics or the recording rules)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from monitoring_support import (
    MONITORING,
    RAW_NAME,
    RECORDED_NAME,
    SELECTOR,
    bad_matchers,
    catalogue,
    recorded_labels,
    run_promtool,
    unknown_names,
)

from monitoring import dashboards

BUILT = dashboards.build()
JSON_DIR = MONITORING / "grafana" / "dashboards"


def _targets(dash: dict) -> list[tuple[dict, dict]]:
    return [(p, t) for p in dashboards.iter_panels(dash) for t in p.get("targets", [])]


def _all_exprs() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, raw expr with template variables) for every target."""
    return [(name, p["title"], t["expr"]) for name, d in BUILT.items() for p, t in _targets(d)]


def test_two_dashboards() -> None:
    assert set(BUILT) == {"overview", "drilldown"}
    assert len({d["uid"] for d in BUILT.values()}) == 2


@pytest.mark.parametrize("name", sorted(BUILT))
def test_committed_json_is_fresh(name: str) -> None:
    path = JSON_DIR / f"{name}.json"
    assert path.is_file(), f"{path} missing: run python -m monitoring.dashboards"
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == BUILT[name], f"{path} is stale: run python -m monitoring.dashboards"
    assert text == dashboards.render(BUILT[name]), f"{path} is not formatted by render(): regenerate it"


def test_no_stray_dashboard_files() -> None:
    assert {p.stem for p in JSON_DIR.glob("*.json")} == set(BUILT)


@pytest.mark.parametrize("name", sorted(BUILT))
def test_dashboard_header(name: str) -> None:
    d = BUILT[name]
    assert d["schemaVersion"] == 39
    assert d["title"] and d["uid"].startswith("cff-inspect-")
    (ds,) = [v for v in d["templating"]["list"] if v["name"] == "datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"


@pytest.mark.parametrize("name", sorted(BUILT))
def test_panels_are_complete(name: str) -> None:
    panels = list(dashboards.iter_panels(BUILT[name]))
    assert panels
    for p in panels:
        where = f"{name} panel {p.get('id')} {p.get('title')!r}"
        assert isinstance(p.get("id"), int) and p["id"] > 0, where
        assert isinstance(p.get("title"), str) and p["title"].strip(), where
        assert isinstance(p.get("description"), str) and len(p["description"]) > 20, f"{where}: description"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert p.get("targets"), f"{where}: no targets"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), f"{where}: duplicate refId"
        for t in p["targets"]:
            assert isinstance(t.get("expr"), str) and t["expr"].strip(), f"{where}: empty expr"
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, f"{where}: gridPos {g}"


def test_panel_ids_and_titles_unique() -> None:
    ids = [p["id"] for d in BUILT.values() for p in dashboards.iter_panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique (stable links to panels)"
    for name, d in BUILT.items():
        titles = [p["title"] for p in dashboards.iter_panels(d)]
        assert len(titles) == len(set(titles)), f"{name}: duplicate panel titles"


def test_panels_do_not_overlap() -> None:
    for name, d in BUILT.items():
        cells: dict[tuple[int, int], int] = {}
        for p in dashboards.iter_panels(d):
            g = p["gridPos"]
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"{name}: panels {cells[(x, y)]} and {p['id']} overlap"
                    cells[(x, y)] = p["id"]


def test_drilldown_variables() -> None:
    variables = {v["name"]: v for v in BUILT["drilldown"]["templating"]["list"]}
    for name in ("camera", "product"):
        v = variables[name]
        assert v["type"] == "query"
        assert v["query"] == f"label_values(inspection_frames_scored_total, {name})"
        assert v["multi"] is True and v["includeAll"] is True and v["allValue"] == ".*"


def test_drilldown_filters_every_selector_with_camera_or_product_labels(series) -> None:  # noqa: ANN001
    """A drilldown panel that ignores the chosen camera/product would silently show everything."""
    problems = []
    for p, t in _targets(BUILT["drilldown"]):
        if "$camera" not in t["expr"] and "$product" not in t["expr"]:
            problems.append(f"{p['title']}: uses neither $camera nor $product")
        for name, body in SELECTOR.findall(t["expr"]):
            labels = series.get(name) or (recorded_labels(name) if ":" in name else frozenset())
            for label in ("camera", "product"):
                if label in labels and f'{label}=~"${label}"' not in body:
                    problems.append(f"{p['title']}: {name} not filtered by {label}")
    assert not problems, "\n".join(problems)


def test_overview_is_not_filtered() -> None:
    for _, _, expr in [e for e in _all_exprs() if e[0] == "overview"]:
        assert "$camera" not in expr and "$product" not in expr


def test_every_name_exists(series, recorded) -> None:  # noqa: ANN001
    problems = []
    for dash, title, expr in _all_exprs():
        for unknown in sorted(unknown_names(expr, set(recorded), set(series))):
            problems.append(f"{dash} / {title}: {unknown} is neither in monitoring.metrics nor a recording rule")
        problems += [f"{dash} / {title}: {p}" for p in bad_matchers(expr, set(recorded), series)]
    for v in BUILT["drilldown"]["templating"]["list"]:
        if v["type"] == "query":
            problems += [f"variable {v['name']}: {n}" for n in unknown_names(v["query"], set(recorded), set(series))]
    assert not problems, "\n".join(problems)


def test_overview_shows_every_metric(recorded) -> None:  # noqa: ANN001
    """Each metric of monitoring.metrics is on the overview, directly or through a recording rule."""
    text = " ".join(e for d, _, e in _all_exprs() if d == "overview")
    used = set(RAW_NAME.findall(text))
    for name in set(RECORDED_NAME.findall(text)) & set(recorded):
        used |= set(RAW_NAME.findall(recorded[name]))
    missing = [m.family for m in catalogue() if not any(s in used for s in m.series_names())]
    assert not missing, f"not on the overview dashboard: {missing}"


def test_every_expression_is_valid_promql(tmp_path: Path) -> None:
    """Substituted expressions as recording rules, checked by `promtool check rules`."""
    queries = [q for d in BUILT.values() for q in dashboards.panel_queries(d)]
    rules = {
        "groups": [
            {
                "name": "dashboard-expressions",
                "rules": [{"record": f"dashboard_check:expr_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)],
            }
        ]
    }
    path = tmp_path / "dashboard_exprs.yml"
    path.write_text(json.dumps(rules, indent=1))  # JSON is YAML
    proc = run_promtool("check", "rules", path)
    assert proc.returncode == 0, f"invalid PromQL in a panel:\n{proc.stdout}\n{proc.stderr}"
    assert f"{len(queries)} rules found" in proc.stdout


def test_panel_queries_substitute_variables() -> None:
    queries = dashboards.panel_queries(BUILT["drilldown"], {"camera": "cam-1|cam-2"})
    assert queries and all(isinstance(t, str) and isinstance(e, str) for t, e in queries)
    assert len(queries) == len(_targets(BUILT["drilldown"]))
    joined = "\n".join(e for _, e in queries)
    assert "$" not in joined
    assert 'camera=~"cam-1|cam-2"' in joined and 'product=~".*"' in joined
    assert "[1m]" in joined and "$__rate_interval" not in joined
    for d in BUILT.values():  # defaults: every variable filled in
        assert all("$" not in e for _, e in dashboards.panel_queries(d))


def test_panel_queries_on_a_small_dashboard() -> None:
    dash = {
        "templating": {"list": [{"name": "datasource"}, {"name": "camera"}, {"name": "product"}]},
        "panels": [
            {
                "title": "A",
                "targets": [
                    {"expr": 'sum(rate(x{camera=~"$camera", product=~"${product}"}[$__rate_interval]))'},
                    {"expr": 'y{product=~"${product:regex}"}[$__interval] + $other'},
                    {"expr": ""},
                ],
            },
            {"title": "Row", "type": "row", "panels": [{"title": "B", "targets": [{"expr": "z[$__range]"}]}]},
        ],
    }
    assert dashboards.panel_queries(dash, {"product": "bottle"}) == [
        ("A", 'sum(rate(x{camera=~".*", product=~"bottle"}[1m]))'),
        ("A", 'y{product=~"bottle"}[15s] + $other'),  # unknown variables stay as they are
        ("B", "z[1h]"),
    ]


def test_error_panels_never_empty() -> None:
    """Counters that only move on errors have no series before the first one: those panels need a fallback."""
    error_metrics = (
        "inspection_dead_lettered_total",
        "inspection_frames_dropped_total",
        "inspection_heads_refused_total",
        "inspection_calibrator_calls_total",
        "inspection_camera_reconnects_total",
        "inspection_head_swaps_total",
        "inspection_defects_total",
    )
    for dash, title, expr in _all_exprs():
        if any(m in expr for m in error_metrics):
            assert re.search(r"\bor\b", expr), f"{dash} / {title}: add `or on() vector(0)` (or a zero series)"


def test_readme_describes_every_panel() -> None:
    readme = (MONITORING / "README.md").read_text()
    for dash, title, _ in _all_exprs():
        assert title in readme, f"README.md does not describe {dash} panel {title!r}"


def test_write_and_check(tmp_path: Path) -> None:
    paths = dashboards.write(tmp_path)
    assert sorted(p.name for p in paths) == ["drilldown.json", "overview.json"]
    assert dashboards.main(["--check", str(tmp_path)]) == 0
    (tmp_path / "overview.json").write_text("{}")
    assert dashboards.main(["--check", str(tmp_path)]) == 1
    assert dashboards.stale(tmp_path) == ["overview"]
