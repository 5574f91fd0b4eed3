"""Every alert has a `promtool test rules` unit test: synthetic series that must fire it (with its labels and
its rendered annotations) and series that must not. Both committed rule files are what the generator writes
now, and hold the same rules."""
from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lookalike.deploy import alerts

MONITORING = Path(__file__).resolve().parents[2] / "manifests" / "monitoring"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian's `prometheus`) is not installed")

T = 'unit="transformer"'


def _fires(name: str, value: str, labels: dict[str, str] | None = None) -> dict:
    """What promtool must see firing: the rule's labels (plus `labels`) and its annotations rendered with
    `value` standing for the description's `{{ $value ... }}` and `{{ $labels.cache }}`."""
    rule = next(r for r in alerts.rule_groups()[0]["rules"] if r["alert"] == name)
    annotations = copy.deepcopy(rule["annotations"])
    text = annotations["description"]
    start, end = text.find("{{ $value"), text.find("}}", text.find("{{ $value")) + 2
    if start >= 0:
        text = text[:start] + value + text[end:]
    annotations["description"] = text.replace("{{ $labels.cache }}", (labels or {}).get("cache", ""))
    return {"exp_labels": {**rule["labels"], **(labels or {})}, "exp_annotations": annotations}


def _case(name: str, series: dict[str, str], fire_at: str, fires: list[dict], quiet_at: str | None = None,
          interval: str = "1m") -> dict:
    checks = [{"eval_time": fire_at, "alertname": name, "exp_alerts": fires}]
    if quiet_at:
        checks.append({"eval_time": quiet_at, "alertname": name, "exp_alerts": []})
    return {"interval": interval, "input_series": [{"series": s, "values": v} for s, v in series.items()],
            "alert_rule_test": checks}


def _histogram(bucket: str) -> dict[str, str]:
    """10 whole requests a minute, all in the bucket whose upper bound is `bucket`."""
    out = {}
    for le in ("0.1", "0.25", "0.5", "+Inf"):
        rising = float(le) >= float(bucket) if le != "+Inf" else True
        out[f'lookalike_request_seconds_bucket{{{T},le="{le}"}}'] = "0+10x40" if rising else "0x40"
    return out


CASES = {
    # Requests of 0.25-0.5 s: their p99 interpolates to 0.4975 s; then requests under 0.1 s.
    "LookalikeLatencyP99AboveSLO": [
        _case("LookalikeLatencyP99AboveSLO", _histogram("0.5"), "20m",
              [_fires("LookalikeLatencyP99AboveSLO", "497.5ms")], quiet_at="9m"),
        _case("LookalikeLatencyP99AboveSLO", _histogram("0.1"), "20m", []),
    ],
    # 2 server errors (500) among 102 answers a minute: 1.96%. 503s alone are not server errors here.
    "LookalikeServerErrors": [
        _case("LookalikeServerErrors", {f'lookalike_responses_total{{{T},status="200"}}': "0+100x30",
                                        f'lookalike_responses_total{{{T},status="500"}}': "0+2x30"},
              "15m", [_fires("LookalikeServerErrors", "1.961%")], quiet_at="4m"),
        _case("LookalikeServerErrors", {f'lookalike_responses_total{{{T},status="200"}}': "0+100x30",
                                        f'lookalike_responses_total{{{T},status="503"}}': "0+5x30"}, "15m", []),
    ],
    "LookalikeUnavailableOrTimingOut": [
        _case("LookalikeUnavailableOrTimingOut", {f'lookalike_responses_total{{{T},status="200"}}': "0+98x30",
                                                  f'lookalike_responses_total{{{T},status="503"}}': "0+1x30",
                                                  f'lookalike_responses_total{{{T},status="504"}}': "0+1x30"},
              "20m", [_fires("LookalikeUnavailableOrTimingOut", "2%")], quiet_at="9m"),
        _case("LookalikeUnavailableOrTimingOut", {f'lookalike_responses_total{{{T},status="200"}}': "0+199x30",
                                                  f'lookalike_responses_total{{{T},status="504"}}': "0+1x30"},
              "20m", []),  # 0.5%: under the threshold
    ],
    # Half the requests the transformer answers are timeouts; client mistakes (400s) are not.
    "LookalikeNotAnsweringWhileReady": [
        _case("LookalikeNotAnsweringWhileReady", {f"lookalike_requests_total{{{T}}}": "0+60x10",
                                                  f'lookalike_errors_total{{{T},kind="timeout"}}': "0+30x10"},
              "3m", [_fires("LookalikeNotAnsweringWhileReady", "50%")]),
        _case("LookalikeNotAnsweringWhileReady", {f"lookalike_requests_total{{{T}}}": "0+60x10",
                                                  f'lookalike_errors_total{{{T},kind="bad_input"}}': "0+30x10"},
              "3m", []),
        # Two deployments on one Prometheus: production's hang is not diluted by dev's healthy traffic.
        _case("LookalikeNotAnsweringWhileReady", {
            f'lookalike_requests_total{{{T},namespace="lookalike"}}': "0+60x10",
            f'lookalike_errors_total{{{T},namespace="lookalike",kind="timeout"}}': "0+30x10",
            f'lookalike_requests_total{{{T},namespace="lookalike-dev"}}': "0+600x10"},
            "3m", [_fires("LookalikeNotAnsweringWhileReady", "50%", {"namespace": "lookalike"})]),
    ],
    # Replica b finished nothing while the transformer sent 2 requests a second; then no predictor at all.
    "LookalikePredictorNotAnswering": [
        _case("LookalikePredictorNotAnswering", {
            f'lookalike_stage_seconds_count{{{T},stage="predict"}}': "0+120x10",
            'lookalike_requests_total{unit="predictor",instance="a"}': "0+120x10",
            'lookalike_requests_total{unit="predictor",instance="b"}': "5x10"},
            "4m", [_fires("LookalikePredictorNotAnswering", "", {"unit": "predictor", "instance": "b"})]),
        _case("LookalikePredictorNotAnswering", {f'lookalike_stage_seconds_count{{{T},stage="predict"}}': "0+120x10"},
              "4m", [_fires("LookalikePredictorNotAnswering", "")]),
        # Nothing sent to it (the transformer refuses every request itself): a silent predictor is not news.
        _case("LookalikePredictorNotAnswering", {f"lookalike_requests_total{{{T}}}": "0+120x10",
                                                 f'lookalike_stage_seconds_count{{{T},stage="predict"}}': "7x10",
                                                 'lookalike_requests_total{unit="predictor",instance="b"}': "5x10"},
              "4m", []),
    ],
    # Two pairs for two hours (the 0 is a pair served before a swap, which does not count).
    "LookalikeVersionSkew": [
        _case("LookalikeVersionSkew", {
            'lookalike_serving_info{unit="predictor",instance="a",model_version="m1",index_version="i2"}': "1x150",
            'lookalike_serving_info{unit="predictor",instance="b",model_version="m1",index_version="i1"}': "1x150"},
            "75m", [_fires("LookalikeVersionSkew", "2")], quiet_at="50m"),
        _case("LookalikeVersionSkew", {
            'lookalike_serving_info{unit="predictor",instance="a",model_version="m1",index_version="i2"}': "1x150",
            'lookalike_serving_info{unit="predictor",instance="b",model_version="m1",index_version="i1"}': "0x150",
            'lookalike_serving_info{unit="predictor",instance="b",model_version="m1",index_version="i2"}': "1x150"},
            "75m", []),
    ],
    # promtool's clock starts at 0: an index built at 0 is 14.5 hours old at 14h30m; one built at 5h is not stale.
    "LookalikeIndexStale": [
        _case("LookalikeIndexStale", {'lookalike_index_built_timestamp_seconds{unit="predictor",instance="a"}':
                                      "0x900", 'lookalike_index_built_timestamp_seconds{unit="predictor",instance="b"}':
                                      "36000x900"},
              "14h30m", [_fires("LookalikeIndexStale", "14.5")], quiet_at="13h10m"),
        _case("LookalikeIndexStale", {'lookalike_index_built_timestamp_seconds{unit="predictor"}': "18000x900"},
              "14h30m", []),
    ],
    # The embedding cache hit 60% of 2 lookups a second for a day, then 20%; the answer cache stays at 60%.
    "LookalikeCacheHitRateDropped": [
        _case("LookalikeCacheHitRateDropped", {
            'lookalike_cache_lookups_total{unit="predictor",cache="embedding",result="hit"}': "0+720x144 103680+240x20",
            'lookalike_cache_lookups_total{unit="predictor",cache="embedding",result="miss"}': "0+480x144 69120+960x20",
            'lookalike_cache_lookups_total{unit="predictor",cache="answer",result="hit"}': "0+720x164",
            'lookalike_cache_lookups_total{unit="predictor",cache="answer",result="miss"}': "0+480x164"},
            "25h40m", [_fires("LookalikeCacheHitRateDropped", "20%", {"cache": "embedding"})], quiet_at="24h50m",
            interval="10m"),
    ],
}


def test_every_alert_has_a_case_that_fires_it():
    assert set(CASES) == {a.name for a in alerts.ALERTS}
    for name, cases in CASES.items():
        assert any(check["exp_alerts"] for case in cases for check in case["alert_rule_test"]), name
        assert any(not check["exp_alerts"] for case in cases for check in case["alert_rule_test"]), name


@needs_promtool
@pytest.mark.parametrize("name", sorted(CASES))
def test_promtool_unit_test(name, tmp_path):
    (tmp_path / "rules.yml").write_text(alerts.dump(alerts.rules_file()))
    (tmp_path / "test.yml").write_text(yaml.safe_dump({"rule_files": ["rules.yml"], "evaluation_interval": "1m",
                                                       "tests": CASES[name]}, sort_keys=False, width=1000))
    proc = subprocess.run([PROMTOOL, "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_promtool_catches_a_case_that_should_not_pass(tmp_path):
    """The harness can fail: the server-error case expecting silence where the alert fires is refused."""
    case = copy.deepcopy(CASES["LookalikeServerErrors"][0])
    case["alert_rule_test"][0]["exp_alerts"] = []
    (tmp_path / "rules.yml").write_text(alerts.dump(alerts.rules_file()))
    (tmp_path / "test.yml").write_text(yaml.safe_dump({"rule_files": ["rules.yml"], "tests": [case]}))
    proc = subprocess.run([PROMTOOL, "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "LookalikeServerErrors" in proc.stdout + proc.stderr


def test_committed_rule_files_are_current_and_agree():
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    plain = yaml.safe_load((MONITORING / "rules.yml").read_text())
    assert (MONITORING / "prometheusrule.yaml").read_text() == alerts.dump(alerts.prometheus_rule()), \
        "run `lookalike manifests alerts`"
    assert (MONITORING / "rules.yml").read_text() == alerts.dump(alerts.rules_file()), \
        "run `lookalike manifests alerts`"
    assert rule["spec"]["groups"] == plain["groups"]


@needs_promtool
def test_committed_rules_pass_promtool_check():
    proc = subprocess.run([PROMTOOL, "check", "rules", str(MONITORING / "rules.yml")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "8 rules found" in proc.stdout, proc.stdout + proc.stderr


def test_time_scale_shrinks_windows_and_for_durations_only():
    fast = {r["alert"]: r for r in alerts.rule_groups(1 / 12)[0]["rules"]}
    slow = {r["alert"]: r for r in alerts.rule_groups()[0]["rules"]}
    name = "LookalikeNotAnsweringWhileReady"
    assert fast[name]["for"] == "5s" and slow[name]["for"] == "1m"
    assert "[5s]" in fast["LookalikeNotAnsweringWhileReady"]["expr"]
    assert fast["LookalikeServerErrors"]["expr"].replace("[25s]", "[5m]") == slow["LookalikeServerErrors"]["expr"]
    assert "offset 2h" in fast["LookalikeCacheHitRateDropped"]["expr"]


def test_cli_writes_and_checks_the_generated_files(tmp_path, capsys):
    from lookalike.cli.main import main

    tree = tmp_path / "manifests"
    shutil.copytree(MONITORING, tree / "monitoring")
    assert main(["manifests", "alerts", "--check", "--manifests", str(tree)]) == 0
    (tree / "monitoring/rules.yml").write_text("groups: []\n")
    assert main(["manifests", "alerts", "--check", "--manifests", str(tree)]) == 1
    assert "stale:" in capsys.readouterr().out
    assert main(["manifests", "alerts", "--manifests", str(tree)]) == 0
    assert (tree / "monitoring/rules.yml").read_text() == (MONITORING / "rules.yml").read_text()
