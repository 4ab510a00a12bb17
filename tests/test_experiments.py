"""The jobs and benchmarks still run: tiny settings of the MInference search and accuracy jobs on the built-in
model, and the prefill benchmark's CPU smoke mode (their real settings run on the GPU; see BENCHMARKS.md)."""

import json

import jax
import numpy as np
import pytest

from lcjax.load import resolve_model_path
from lcjax.methods.minference import MInferenceConfig


@pytest.fixture(scope="module", autouse=True)
def builtin_model():
    try:
        resolve_model_path("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_search_then_accuracy_on_the_builtin_model(tmp_path, capsys):
    from lcjax.jobs import minference_accuracy, minference_search

    config_path = tmp_path / "cfg.json"
    minference_search.main(
        ["--length", "300", "--depths", "0.5", "--question-rows", "8", "--dtype", "float32", "--out", str(config_path)]
    )
    config = MInferenceConfig.from_json(config_path)
    config.check(30, 9)
    rows_path = tmp_path / "rows.json"
    minference_accuracy.main(
        [
            "--length",
            "300",
            "--depths",
            "2",
            "--methods",
            "minference",
            "--pattern-config",
            str(config_path),
            "--backend",
            "xla",
            "--dtype",
            "float32",
            "--json",
            str(rows_path),
        ]
    )
    rows = {r["method"]: r for r in json.loads(rows_path.read_text())}
    assert set(rows) == {"minference"} and rows["minference"]["n"] == 2
    assert 0 < rows["minference"]["tile_cost"] <= 1.0
    assert "| minference |" in capsys.readouterr().out


def test_bench_prefill_cpu_smoke_appends_its_run_to_a_benchmarks_file(tmp_path, monkeypatch):
    """The prefill benchmark end to end at toy sizes (interpret mode): the report it appends names date, device,
    jax, the command, its checks and one table row per length and index set."""
    from benchmarks import sparse_prefill as bench_prefill

    monkeypatch.setenv("OUT", str(tmp_path))
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# earlier content\n")
    args = ["--cpu-smoke", "--variants", "ranges:64:cover", "--kernels", "--json", "--benchmarks-md", str(target)]
    bench_prefill.main(args)
    text = target.read_text()
    assert text.startswith("# earlier content\n")  # appended, not overwritten
    assert "## bench_prefill run" in text and f"jax {jax.__version__}" in text
    assert "- Command: `python -m benchmarks.sparse_prefill " + " ".join(args) + "`" in text
    assert "kernels section skipped" in text and "smoke L=256: lcjax interpret vs reference rel L2" in text
    rows = [line for line in text.splitlines() if line.startswith("| 256 ")]
    assert len(rows) == 3  # cuDNN (XLA on CPU), the variant on both index sets
    assert (tmp_path / "bench_prefill.json").exists()


def test_profile_decode_names_the_ops_inside_each_fusion(tmp_path):
    """`profile_decode` labels each traced kernel with the HLO ops of its fusion, also inside a while loop (the
    profiler spells fusion "x.12" as "x_12"); on a machine without a GPU it says so."""
    import re

    import jax.numpy as jnp

    from benchmarks.profile_decode import fusion_ops
    from benchmarks.timing import kernel_times

    def body(carry):
        i, x = carry
        return i + 1, jnp.concatenate([jnp.sin(x[:, :3]) * x[:, :3], x[:, 3:]], 1) @ x

    hlo = (
        jax.jit(lambda x: jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x)))
        .lower(jnp.ones((8, 8)))
        .compile()
        .as_text()
    )
    ops = {n: fusion_ops(hlo, n.replace(".", "_")) for n in re.findall(r"%(\S*fusion\S*) = ", hlo)}
    assert any({"sine", "concatenate"} <= set(o.split(",")) for o in ops.values()), ops
    assert fusion_ops(hlo, "no_such_fusion") == ""
    if jax.default_backend() != "gpu":
        jax.profiler.start_trace(str(tmp_path))
        jax.block_until_ready(jnp.ones(4) * 2)
        jax.profiler.stop_trace()
        with pytest.raises(RuntimeError, match="needs a GPU"):
            kernel_times(str(tmp_path))


def test_decode_benchmark_rows_run_at_toy_sizes():
    """`benchmarks.decode_model`'s lcjax rows for the dense, KIVI, Quest and RetrievalAttention caches (a method's
    settings after a colon), on a tiny model on the CPU: the
    code the GPU run uses (it reports a failing row and goes on, so a broken call would only show as a missing
    row there)."""
    import jax.numpy as jnp

    from benchmarks.decode_model import cache_specs, lcjax_rows
    from lcjax.config import ModelConfig
    from lcjax.models.transformer import Transformer

    config = ModelConfig(
        family="llama", vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=2,
        num_kv_heads=1, head_dim=64, max_position_embeddings=512,
    )  # fmt: skip
    model = Transformer.init(config, jax.random.key(0), dtype=jnp.float32)
    caches = cache_specs("dense,kivi,quest,retr_attn:index=graph,top_k=8,sink=4,recent=8")
    rows = lcjax_rows(model, [(1, 64)], new=3, samples=1, rng=np.random.default_rng(0), caches=caches)
    assert [r["impl"] for r in rows] == [
        "lcjax", "lcjax + kivi", "lcjax + quest", "lcjax + retr_attn:index=graph,top_k=8,sink=4,recent=8"
    ]  # fmt: skip
    assert rows[-1]["host_gib"] > 0
    assert all(r["step_ms"] > 0 and r["cache_gib"] > 0 for r in rows)
