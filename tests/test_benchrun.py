"""`hongbao bench` finds every benchmark it names, and sums their figures up in one table."""

from __future__ import annotations

from gateway.ops import benchrun


def test_every_named_benchmark_is_a_file_with_a_main():
    """Read, not imported: a benchmark may need the `bench` dependency group."""
    assert benchrun.BENCH_DIR.is_dir(), benchrun.BENCH_DIR
    for name in benchrun.NAMES:
        path = benchrun.BENCH_DIR / f"bench_{name}.py"
        assert "\ndef main(argv" in path.read_text(), name


def test_figures_flatten_nested_results_and_keep_failures_visible(capsys):
    rows = benchrun._figures({"per_s": 12345.678, "ratio": 1.25, "met": {"ratio": True},
                              "samples": [1, 2, 3], "note": "ok"})
    assert rows == [("per_s", "12,346"), ("ratio", "1.25"), ("met.ratio", "True"),
                    ("note", "ok")]
    benchrun._summary({"a": {"x": 1}, "b": RuntimeError("boom")})
    out = capsys.readouterr().out
    assert "FAILED" in out and "boom" in out


def test_an_unknown_name_is_refused(capsys):
    assert benchrun.main(["nope"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
