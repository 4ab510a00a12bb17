"""The runnable jobs still run: tiny settings of the MInference search and accuracy experiments on the built-in
model, and the prefill benchmark's CPU smoke mode (their real settings run on the GPU; see BENCHMARKS.md)."""

import json

import jax
import numpy as np

import pytest

from lcjax.methods.minference import MInferenceConfig


@pytest.fixture(scope="module", autouse=True)
def builtin_model():
    import lcjax
    try:
        lcjax.loading.model.resolve_model_path("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_search_then_accuracy_on_the_builtin_model(tmp_path, capsys):
    from experiments import minference_accuracy, minference_search
    config_path = tmp_path / "cfg.json"
    minference_search.main(["--length", "300", "--depths", "0.5", "--question-rows", "32", "--dtype", "float32",
                            "--out", str(config_path)])
    config = MInferenceConfig.from_json(config_path)
    config.check(30, 9)
    rows_path = tmp_path / "rows.json"
    minference_accuracy.main(["--length", "300", "--depths", "2", "--methods", "dense", "a_shape", "minference",
                              "--pattern-config", str(config_path), "--backend", "xla", "--dtype", "float32",
                              "--json", str(rows_path)])
    rows = {r["method"]: r for r in json.loads(rows_path.read_text())}
    assert set(rows) == {"dense", "a_shape", "minference"}
    assert rows["dense"]["tile_cost"] == 1.0 and rows["dense"]["n"] == 2
    # at 300 tokens SCBench's A-shape (128 + 3968) covers every key: same answers as dense, every tile
    assert rows["a_shape"]["accuracy"] == rows["dense"]["accuracy"] and rows["a_shape"]["tile_cost"] == 1.0
    assert "| minference |" in capsys.readouterr().out


def test_bench_prefill_cpu_smoke_appends_its_run_to_a_benchmarks_file(tmp_path, monkeypatch):
    """The prefill benchmark end to end at toy sizes (interpret mode): the report it appends names date, device,
    jax, the command, its checks and one table row per length and index set."""
    from experiments import bench_prefill

    monkeypatch.setenv("OUT", str(tmp_path))
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# earlier content\n")
    args = ["--cpu-smoke", "--variants", "ranges:64:cover", "--kernels", "--json", "--benchmarks-md", str(target)]
    bench_prefill.main(args)
    text = target.read_text()
    assert text.startswith("# earlier content\n")  # appended, not overwritten
    assert "## bench_prefill run" in text and f"jax {jax.__version__}" in text
    assert "- Command: `python -m experiments.bench_prefill " + " ".join(args) + "`" in text
    assert "kernels section skipped" in text and "smoke L=256: lcjax interpret vs reference rel L2" in text
    rows = [line for line in text.splitlines() if line.startswith("| 256 ") or line.startswith("| 512 ")]
    assert len(rows) == 2 * 3  # per length: cuDNN (XLA on CPU), the variant on both index sets
    assert (tmp_path / "bench_prefill.json").exists()


def test_profile_decode_names_the_ops_inside_each_fusion(tmp_path):
    """`profile_decode` labels each traced kernel with the HLO ops of its fusion, also inside a while loop (the
    profiler spells fusion "x.12" as "x_12"); on a machine without a GPU it says so."""
    import re

    import jax.numpy as jnp

    from experiments.profile_decode import fusion_ops, kernel_times

    def body(carry):
        i, x = carry
        return i + 1, jnp.concatenate([jnp.sin(x[:, :3]) * x[:, :3], x[:, 3:]], 1) @ x

    hlo = jax.jit(lambda x: jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))).lower(
        jnp.ones((8, 8))).compile().as_text()
    ops = {n: fusion_ops(hlo, n.replace(".", "_")) for n in re.findall(r"%(\S*fusion\S*) = ", hlo)}
    assert any({"sine", "concatenate"} <= set(o.split(",")) for o in ops.values()), ops
    assert fusion_ops(hlo, "no_such_fusion") == ""
    if jax.default_backend() != "gpu":
        jax.profiler.start_trace(str(tmp_path))
        jax.block_until_ready(jnp.ones(4) * 2)
        jax.profiler.stop_trace()
        with pytest.raises(RuntimeError, match="needs a GPU"):
            kernel_times(str(tmp_path))


def test_bench_gemv_pallas_kernel_equals_float64_product():
    """The Pallas GEMV `bench_gemv` times (interpret mode here) against numpy in float64, batch 1 and 3."""
    import jax.numpy as jnp
    import numpy as np

    from experiments.bench_gemv import pallas_gemv

    rng = np.random.default_rng()
    w = jnp.asarray(rng.normal(size=(96, 128)), jnp.bfloat16)
    for m in (1, 3):
        x = jnp.asarray(rng.normal(size=(m, 128)), jnp.bfloat16)
        got = pallas_gemv(x, w, block_out=32, block_in=64, interpret=True)
        want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
        assert got.shape == (m, 96) and got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
    with pytest.raises(ValueError, match="block_out"):
        pallas_gemv(x, w, block_out=40, block_in=64, interpret=True)


def test_kv_layout_probe_folds_the_kv_heads_into_the_batch_exactly():
    """The probe's two calls must compute the same function: the kernel with the KV heads folded into the batch
    (`fold_heads`, then `unfold_output`) gives the plain call's output bit for bit (Triton kernel, interpret
    mode). Lists of 60% of the causal blocks differ between heads, so a fold that mixed heads up would show."""
    from experiments.probe_kv_layout import layout_case
    r = layout_case(jax.random.key(0), 128, 0.6, True, 32, 32)
    assert r["tiles"] > 32 * 4          # more than the 4 diagonal blocks of each of the 32 heads
    assert r["bitwise_equal"] and r["finite"]


def test_span_lists_keep_lengths_and_the_diagonal_and_draw_within_the_span():
    """The L2-reach probe's lists: each query block's list as long as the random lists' (where the span allows),
    distinct causal blocks, the diagonal kept, every other block below the span."""
    from experiments.bench_sparse_kernels import random_block_lists
    length, bq, bk, span, density = 4096, 64, 64, 16, 0.1
    idx, counts = (np.asarray(x) for x in random_block_lists(jax.random.key(1), length, bq, bk, density, span))
    _, random_counts = random_block_lists(jax.random.key(1), length, bq, bk, density)
    np.testing.assert_array_equal(counts, np.minimum(np.asarray(random_counts), np.minimum(span, np.arange(64)) + 1))
    for h in range(idx.shape[1]):
        for qb in range(idx.shape[2]):
            blocks = idx[0, h, qb, :counts[0, h, qb]]
            assert qb in blocks and len(set(blocks.tolist())) == len(blocks)
            assert all(b < min(span, qb) for b in blocks if b != qb)
    assert len({tuple(idx[0, h, 63, :counts[0, h, 63]]) for h in range(idx.shape[1])}) > 1   # heads differ
