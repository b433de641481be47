"""bench/bench_optim.py: a --small run times every torch SGD implementation and writes its table."""


def test_optimizer_benchmark_runs_every_torch_implementation(tmp_path):
    from bench import bench_optim

    rows = bench_optim.main(["--small", "--student", "pspnet_tiny", "--teacher", "pspnet_tiny", "--out", str(tmp_path)])
    assert set(rows) >= {"fused", "foreach", "plain"} and all(ms > 0 for ms in rows.values())
    assert "| fused |" in next(tmp_path.glob("optim_*_small.md")).read_text()
