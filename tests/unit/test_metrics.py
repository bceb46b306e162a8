"""The Prometheus registry and its text exposition format."""

from __future__ import annotations

import math

import pytest

from pleaco.metrics import Counter, Gauge, Histogram, Registry


def test_counter_with_labels_renders_exact_lines() -> None:
    reg = Registry()
    c = reg.register(Counter("pleaco_requests_total", "HTTP requests.", ("method", "code")))
    c.inc(method="GET", code="200")
    c.inc(2, method="GET", code="200")
    c.inc(method="POST", code="500")
    assert reg.render() == (
        "# HELP pleaco_requests_total HTTP requests.\n"
        "# TYPE pleaco_requests_total counter\n"
        'pleaco_requests_total{method="GET",code="200"} 3\n'
        'pleaco_requests_total{method="POST",code="500"} 1\n'
    )
    assert c.value(method="GET", code="200") == 3
    assert c.value(method="PUT", code="200") == 0


def test_counter_without_labels_and_fractional_values() -> None:
    reg = Registry()
    c = reg.register(Counter("bytes_total", "Bytes."))
    c.inc(0.5)
    c.inc(1)
    assert reg.render().splitlines()[-1] == "bytes_total 1.5"


def test_counter_with_no_samples_renders_only_the_header() -> None:
    reg = Registry()
    reg.register(Counter("idle_total", "Nothing yet.", ("app",)))
    assert reg.render() == "# HELP idle_total Nothing yet.\n# TYPE idle_total counter\n"


def test_gauge_set_overwrites() -> None:
    reg = Registry()
    g = reg.register(Gauge("pleaco_replicas", "Replicas.", ("app",)))
    g.set(3, app="web")
    g.set(1, app="web")
    g.set(2.25, app="api")
    assert reg.render() == (
        "# HELP pleaco_replicas Replicas.\n"
        "# TYPE pleaco_replicas gauge\n"
        'pleaco_replicas{app="api"} 2.25\n'
        'pleaco_replicas{app="web"} 1\n'
    )


def test_gauge_collect_callback_is_called_at_scrape_time() -> None:
    state: dict[tuple[str, ...], float] = {("a",): 1.0}
    reg = Registry()
    reg.register(Gauge("live", "Live.", ("node",), collect=lambda: dict(state)))
    assert reg.render().splitlines()[-1] == 'live{node="a"} 1'
    state[("b",)] = -2.0
    assert reg.render().splitlines()[-2:] == ['live{node="a"} 1', 'live{node="b"} -2']


def test_histogram_buckets_are_cumulative() -> None:
    reg = Registry()
    h = reg.register(Histogram("latency_seconds", "Latency.", ("app",), buckets=(1.0, 0.125)))
    for v in (0.0625, 0.125, 0.5, 2.0):  # exact binary fractions: the sum is exact
        h.observe(v, app="web")
    assert reg.render() == (
        "# HELP latency_seconds Latency.\n"
        "# TYPE latency_seconds histogram\n"
        'latency_seconds_bucket{app="web",le="0.125"} 2\n'  # 0.125 itself counts (le is <=)
        'latency_seconds_bucket{app="web",le="1"} 3\n'
        'latency_seconds_bucket{app="web",le="+Inf"} 4\n'
        'latency_seconds_sum{app="web"} 2.6875\n'
        'latency_seconds_count{app="web"} 4\n'
    )
    assert h.count(app="web") == 4
    assert h.count(app="other") == 0


def test_histogram_without_labels_and_default_buckets() -> None:
    reg = Registry()
    h = reg.register(Histogram("t", "T."))
    h.observe(100.0)
    lines = reg.render().splitlines()
    buckets = [line for line in lines if line.startswith("t_bucket")]
    assert len(buckets) == len(Histogram.DEFAULT_BUCKETS) + 1
    assert buckets[0] == 't_bucket{le="0.005"} 0'
    assert buckets[-2] == 't_bucket{le="10"} 0'
    assert buckets[-1] == 't_bucket{le="+Inf"} 1'
    assert lines[-2:] == ["t_sum 100", "t_count 1"]


def test_histogram_series_are_separate_per_label_set() -> None:
    reg = Registry()
    h = reg.register(Histogram("h", "H.", ("app",), buckets=(1.0,)))
    h.observe(0.5, app="b")
    h.observe(5.0, app="a")
    assert reg.render().splitlines()[2:] == [
        'h_bucket{app="a",le="1"} 0',
        'h_bucket{app="a",le="+Inf"} 1',
        'h_sum{app="a"} 5',
        'h_count{app="a"} 1',
        'h_bucket{app="b",le="1"} 1',
        'h_bucket{app="b",le="+Inf"} 1',
        'h_sum{app="b"} 0.5',
        'h_count{app="b"} 1',
    ]


def test_label_values_are_escaped() -> None:
    reg = Registry()
    c = reg.register(Counter("c", "C.", ("path",)))
    c.inc(path='say "hi"\nback\\slash')
    assert reg.render().splitlines()[-1] == r'c{path="say \"hi\"\nback\\slash"} 1'


def test_wrong_labels_are_refused() -> None:
    c = Counter("c", "C.", ("app",))
    with pytest.raises(ValueError, match="labels"):
        c.inc()
    with pytest.raises(ValueError):
        c.inc(app="x", node="y")
    with pytest.raises(ValueError):
        Gauge("g", "G.").set(1, app="x")
    with pytest.raises(ValueError):
        Histogram("h", "H.", ("app",)).observe(1.0, other="x")


def test_registry_renders_metrics_in_registration_order() -> None:
    reg = Registry()
    reg.register(Gauge("zzz", "Z."))
    reg.register(Counter("aaa", "A."))
    lines = reg.render().splitlines()
    assert [line for line in lines if line.startswith("# TYPE")] == ["# TYPE zzz gauge", "# TYPE aaa counter"]


def test_special_values() -> None:
    reg = Registry()
    g = reg.register(Gauge("g", "G.", ("k",)))
    g.set(math.inf, k="a")
    g.set(-math.inf, k="b")
    g.set(1e21, k="c")
    assert reg.render().splitlines()[2:] == ['g{k="a"} +Inf', 'g{k="b"} -Inf', 'g{k="c"} 1000000000000000000000']
