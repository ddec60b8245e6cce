"""bench/run.py turns raw results into docs/BENCHMARKS.md: every target row says measured, goal and
whether it is met, judged from the numbers (not copied); the notes quote this run's figures."""

from __future__ import annotations

from bench.run import notes, render, targets


def results(speedups=(1.8, 3.2), ratio=2.7, frac=0.8):
    scen = [{"name": "default", "members": 8, "batch1_ms": 0.2, "rps_off": 1000.0, "rps_on": 1000.0 * speedups[0],
             "speedup": speedups[0], "mean_batch_rows": 15.5, "tool": "wrk"},
            {"name": "mlp-4096", "members": 5, "batch1_ms": 30.0, "rps_off": 60.0, "rps_on": 60.0 * speedups[1],
             "speedup": speedups[1], "mean_batch_rows": 9.0, "tool": "wrk",
             "p50_ms_off": 500.0, "p99_ms_off": 700.0, "p50_ms_on": 90.0, "p99_ms_on": 140.0}]
    lat = {"median_ms": 0.3, "p99_ms": 0.6, "mean_ms": 0.35, "n": 10}
    return {
        "batching": {"clients": 32, "rounds": 3, "seconds_per_run": 5.0, "scenarios": scen},
        "http": {"predict": {**lat, "median_ms": 0.3 * ratio}, "predict_one": {**lat, "median_ms": 0.5}, "echo": lat,
                 "predict_over_echo_median": ratio, "one_over_echo_median": 0.5 / 0.3, "non_model_over_echo_mean": 1.5,
                 "model_in_server_mean_ms": 0.2, "single_model_variant": "merged",
                 "rps": {"echo": {"rps": 3000.0, "tool": "wrk"}, "predict": {"rps": 1200.0, "tool": "wrk"}}},
        "scale": {"members": [{"arch": "mlp", "k": 5, "hidden": "[256, 256]", "batch": 256, "ensemble_us": 2000.0,
                               "one_member_us": 420.0, "ensemble_over_one": 4.76, "gflops": 100.0}],
                  "fused_b256_fraction_of_peak": frac, "gemm_peak_gflops_1thread": 125.0,
                  "gemm": {"peak_torch": {"gflops": 125.0}, "peak_onnxruntime": {"gflops": 110.0}}},
    }


def test_each_target_is_judged_from_its_numbers():
    rows = {label: (value, goal, ok) for label, value, goal, ok in targets(results())}
    batching = {label: ok for label, (_, _, ok) in rows.items() if label.startswith("throughput with")}
    assert len(batching) == 2
    assert [ok for label, ok in sorted(batching.items(), key=lambda kv: "4096" in kv[0])] == [False, True]  # 1.8 < 3 <= 3.2
    echo = next(v for label, v in rows.items() if "default 8-member ensemble) ÷ echo" in label)
    assert echo == ("2.700", "≤ 1.25", False)
    gemm = next(v for label, v in rows.items() if "GEMM peak" in label)
    assert gemm == ("80%", "≥ 0.85", False)
    gemm_met = next(ok for label, _, _, ok in targets(results(frac=0.86)) if "GEMM peak" in label)
    assert gemm_met is True
    comparisons = [ok for label, (_, goal, ok) in rows.items() if goal == "(for comparison)"]
    assert comparisons and all(ok is None for ok in comparisons)  # no goal, never "met"


def test_notes_and_page_quote_this_runs_figures():
    text = "\n".join(notes(results()))
    assert "1.80x" in text and "0.300 ms" in text and "torch 125" in text
    page = render(results(), ["bench_batching.png"], smoke=False)
    assert ("| 5 MLPs 64-4096-4096-10 (30.00 ms at batch 1) | 30.00 | 60 | 192 | 3.20 | 9.0 "
            "| 500.0 / 700.0 | 90.0 / 140.0 |") in page
    assert "3 alternating rounds of 5.0 s" in page and "![bench_batching.png](bench_batching.png)" in page
    assert "| /echo (no model) | 0.300 | 0.600 | 3000 (wrk) |" in page


def test_plots_are_written(tmp_path):
    from bench.run import plots

    made = plots(results(), tmp_path)
    assert made == ["bench_scale.png", "bench_batching.png"]  # no payload results: no payload plot
    for name in made:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_byo_image_section_quotes_the_rows():
    """bench/bench_byo_image.py's report: one row per batch size with its own fused ÷ loop figure."""
    byo = {"members": {"resnet18": "timm:resnet18", "mobilenet_v3_small": "torchvision:mobilenet_v3_small"},
           "parameters": {"resnet18": 11_181_642, "mobilenet_v3_small": 1_528_106}, "image": [3, 224, 224],
           "threads": 1, "torch": "2.14.1", "onnxruntime": "1.32.0", "max_abs_diff_fused_vs_loop": 2e-8,
           "date": "2026-12-04", "machine": "Some CPU, 2 cores", "load_average": 6.25,
           "rows": [{"batch": 1, "fused_ms": 30.0, "loop_ms": 40.0, "fused_over_loop": 0.75},
                    {"batch": 32, "fused_ms": 900.0, "loop_ms": 950.0, "fused_over_loop": 900 / 950}]}
    page = render({**results(), "byo_image": byo}, [], smoke=False)
    assert "## Bring-your-own image ensemble: fused ÷ members loop" in page
    assert "timm:resnet18 (11.2 M parameters), torchvision:mobilenet_v3_small (1.5 M parameters)" in page
    assert "measured 2026-12-04 on Some CPU, 2 cores (1-minute load average 6.2 at the end" in page
    assert "| 1 | 30.00 | 40.00 | 0.750 |" in page and "| 32 | 900.00 | 950.00 | 0.947 |" in page
    assert "byo_image: `.venv/bin/python -m bench.bench_byo_image`" in page
    assert "Bring-your-own image" not in render(results(), [], smoke=False)  # no results: no section
