"""The alerts tried for real: Debian's Prometheus on loopback scrapes a served stack (the two KServe processes)
every second and evaluates the project's own rules, with every window and `for:` shrunk twelvefold
(`alerts.rules_file(time_scale=1/12)`). While clients keep searching, the predictor is frozen (SIGSTOP):
the transformer stays ready and answers 504s, and "not answering while ready" must fire; once the predictor
continues (SIGCONT) the alert must resolve. Each within a bounded time."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml

from lookalike.deploy import alerts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "app"))
from test_serving import _rest_infer, _server_env, pair  # noqa: E402,F401 - the shared published pair fixture

PROMETHEUS = shutil.which("prometheus")
ALERT = "LookalikeNotAnsweringWhileReady"
TIME_SCALE = 1 / 12  # 1-minute windows and `for:` become 5 s
BOUND_S = 45  # fire (or resolve) within this: 5 s window + 5 s `for:` + scrape and evaluation lag, with room


def _alert_states(base: str) -> dict[str, str]:
    reply = httpx.get(f"{base}/api/v1/alerts", timeout=5).json()
    return {a["labels"]["alertname"]: a["state"] for a in reply["data"]["alerts"]}


def _wait_for(what: str, check, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if check():
            return time.monotonic() - start
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout_s} s")


@pytest.fixture
def prometheus(tmp_path):
    """Start Prometheus on a free loopback port with the given scrape targets; stop it afterwards."""
    from lookalike.core.store_server import free_port

    procs = []

    def start(targets: dict[str, str]) -> str:
        (tmp_path / "rules.yml").write_text(alerts.dump(alerts.rules_file(time_scale=TIME_SCALE)))
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
                  "rule_files": ["rules.yml"],
                  "scrape_configs": [{"job_name": "lookalike", "static_configs": [
                      {"targets": [address], "labels": {"pod": name}} for name, address in targets.items()]}]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = open(tmp_path / "prometheus.log", "wb")
        procs.append(subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        log.close()
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(f"{base}/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        _wait_for("Prometheus ready", ready, 30)
        return base

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=15)


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's `prometheus` is not installed (install.sh installs it)")
def test_a_frozen_predictor_fires_not_answering_while_ready_and_resolves(pair, prometheus, tmp_path):  # noqa: F811
    from lookalike.app.serving_stack import ServingStack

    stack = ServingStack(_server_env(pair), log_dir=tmp_path / "logs", predictor_timeout_s=1.0)
    stop = threading.Event()
    statuses: Counter = Counter()
    photos = list(pair["photos"].values())[:4]

    def client(i: int) -> None:
        while not stop.is_set():
            try:
                statuses[_rest_infer(stack.endpoints["transformer_rest"], [photos[i]], timeout=10).status_code] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1

    clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(3)]
    try:
        stack.start()
        base = prometheus({"transformer": stack.endpoints["transformer_rest"].removeprefix("http://"),
                           "predictor": stack.endpoints["predictor_rest"].removeprefix("http://")})
        for thread in clients:
            thread.start()

        def scraped_and_quiet() -> bool:
            q = httpx.get(f"{base}/api/v1/query", params={"query": 'sum(lookalike_requests_total{unit="predictor"})'},
                          timeout=5).json()["data"]["result"]
            return bool(q) and float(q[0]["value"][1]) > 0 and ALERT not in _alert_states(base)
        _wait_for("both servers scraped with traffic flowing", scraped_and_quiet, 30)
        built = httpx.get(f"{base}/api/v1/query", params={
            "query": 'time() - lookalike_index_built_timestamp_seconds{unit="predictor"}'}, timeout=5).json()
        age_s = float(built["data"]["result"][0]["value"][1])
        assert 0 <= age_s < 3600, age_s  # the served index's build time, from its card, on /metrics
        time.sleep(3)  # a few evaluations with the predictor answering: nothing fires
        assert ALERT not in _alert_states(base)
        answered_before = statuses[200]
        assert answered_before > 0, statuses

        os.kill(stack.predictor.pid, signal.SIGSTOP)
        fired_s = _wait_for(f"{ALERT} firing", lambda: _alert_states(base).get(ALERT) == "firing", BOUND_S)
        states = _alert_states(base)
        assert statuses[504] > 0, statuses  # the transformer answered, with timeouts: it was ready all along

        os.kill(stack.predictor.pid, signal.SIGCONT)
        resolved_s = _wait_for(f"{ALERT} resolved", lambda: ALERT not in _alert_states(base), BOUND_S)
        answered_after = statuses[200]
        _wait_for("answers again", lambda: statuses[200] > answered_after, 20)
        print(f"fired after {fired_s:.1f} s, resolved {resolved_s:.1f} s after SIGCONT; alerts while frozen: "
              f"{states}; answers: {dict(statuses)}")
    finally:
        stop.set()
        if stack.predictor is not None and stack.predictor.poll() is None:
            os.kill(stack.predictor.pid, signal.SIGCONT)
        for thread in clients:
            if thread.is_alive():
                thread.join(timeout=15)
        stack.stop()
