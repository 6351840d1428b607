"""Smoke tests of benchmarks/: FLOP counts, MFU and a tiny CPU run of train_throughput.py."""

import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest

from tests.helpers import F32_EPS

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _load(name):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


flops = _load("flops")
throughput = _load("train_throughput")


def test_xla_flops_accepts_every_cost_analysis_form():
    assert flops.xla_flops({"flops": 7.0, "bytes accessed": 3.0}) == 7.0
    assert flops.xla_flops([{"flops": 2.0}, {"flops": 5.0}]) == 7.0  # older JAX: a list
    assert flops.xla_flops(None) is None
    assert flops.xla_flops([]) is None
    assert flops.xla_flops([{"bytes accessed": 1.0}]) is None  # no flops key
    assert flops.xla_flops({"flops": -1.0}) is None  # XLA's "unknown"


def test_known_peaks_and_utilization():
    h200 = flops.known_peak_tflops("NVIDIA H200")
    assert h200 == {"bfloat16": 989.4, "tf32": 494.7, "float32": 66.9}
    assert flops.known_peak_tflops("NVIDIA H100 80GB HBM3") == h200
    assert flops.known_peak_tflops("NVIDIA H100 PCIe") is None  # other clocks: not guessed
    assert flops.known_peak_tflops("cpu") is None
    # 2e12 FLOP/step at 50 steps/s on 2 devices of 100 TFLOP/s: 1e14 / 2e14.
    assert flops.utilization(2e12, 50.0, 100.0, 2) == pytest.approx(0.5, rel=1e-12)
    assert flops.utilization(None, 50.0, 100.0, 1) is None
    assert flops.utilization(1.0, 50.0, None, 1) is None


def test_step_formula_and_bad_input():
    # k attack steps of 2F, a training step of 3F - F1, per example.
    assert flops.pgd_at_step_flops(100.0, 10.0, 10, 4) == 4 * (23 * 100.0 - 10.0)
    assert flops.pgd_at_step_flops(100.0, 10.0, 0, 1) == 290.0
    with pytest.raises(ValueError, match="first_layer"):
        flops.pgd_at_step_flops(1.0, 2.0, 10, 1)


def test_conv_and_dense_counts_match_their_formulas():
    import jax
    import jax.numpy as jnp

    def f(x, w, m):
        y = jax.lax.conv_general_dilated(
            x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y.reshape(y.shape[0], -1) @ m

    x, w, m = jnp.ones((3, 9, 9, 4)), jnp.ones((3, 3, 4, 6)), jnp.ones((5 * 5 * 6, 7))
    counts = flops.matmul_flops(jax.make_jaxpr(f)(x, w, m))
    # Output 5x5x6 per example, 3*3*4 multiply-adds each; then 150 x 7 per example.
    assert counts == [2.0 * 3 * 5 * 5 * 6 * (3 * 3 * 4), 2.0 * 3 * 150 * 7]


def test_small_cnn_forward_count_from_its_architecture():
    import jax

    from jax_memat.models import get_model, init_model, make_apply_fn

    module = get_model("small_cnn", 10)
    variables = init_model(module, jax.random.key(0), (28, 28, 1))
    forward, first = flops.forward_flops(make_apply_fn(module), variables, (28, 28, 1))
    # conv 3x3/2 1->32 (14x14 out), conv 3x3/2 32->64 (7x7), max pool to 4x4,
    # dense 1024->128, dense 128->10 (small_cnn.py).
    conv1 = 2 * 14 * 14 * 32 * (3 * 3 * 1)
    conv2 = 2 * 7 * 7 * 64 * (3 * 3 * 32)
    dense = 2 * (4 * 4 * 64) * 128 + 2 * 128 * 10
    assert (forward, first) == (conv1 + conv2 + dense, conv1)


def test_train_throughput_small_cnn_cpu_counts_and_mfu(capsys):
    report = throughput.main(
        [
            "--models=small_cnn",
            "--frameworks=jax",
            "--batch-size=16",
            "--steps=1",
            "--warmup=1",
            "--device=cpu",
            "--no-isolate",
            "--peak-tflops=0.5",
        ]
    )
    (r,) = report["results"]
    assert "error" not in r, r.get("error")
    assert r["examples_per_s"] > 0 and math.isfinite(r["final_loss"])
    assert report["settings"]["image_shape_hwc"] == {"small_cnn": [28, 28, 1]}
    assert r["flops_analytic"] == flops.pgd_at_step_flops(
        r["flops_forward_per_example"], r["flops_first_layer_per_example"], 10, 16
    )
    # XLA counts a loop's body once, so it is compared with the step with one attack
    # iteration; it adds the elementwise work (BatchNorm, ReLU, the attack's sign and
    # projection, SGD) and leaves out the padded border of every convolution, and the
    # simulated devices add their collectives: 0.97-1.03 measured, far from the 23/5
    # a count of all ten iterations would give. The band leaves room for XLA:CPU's
    # fusion choices on other instruction sets while still telling 1 from 4.6.
    assert 0.5 <= r["flops_xla_over_analytic_loop_once"] <= 2.5
    expected_mfu = r["flops_analytic"] * (1e3 / r["ms_per_step"]) / (0.5e12 * r["devices_used"])
    assert r["mfu"] == pytest.approx(expected_mfu, rel=1e-9)
    assert r["peak_tflops_source"] == "--peak-tflops"
    # XLA's accounting of the step: the donated state is aliased; no device allocator on CPU.
    c = r["compiled_memory"]
    assert 0 < c["alias"] <= c["argument"] and c["temp"] > 0
    assert r["device_memory_at"] is None and r["compile_s"] <= r["first_call_s"]
    out = capsys.readouterr().out
    assert f"{100 * r['mfu']:.1f}%" in out


def test_peak_tflops_flag_refuses_nonsense():
    with pytest.raises(SystemExit):
        throughput.parse_args(["--peak-tflops=-3"])
    with pytest.raises(SystemExit):
        throughput.parse_args(["--models=small_cnn,vgg"])


def test_train_throughput_torch_variants_side_by_side(capsys):
    pytest.importorskip("torch")  # the optional bench dependency
    report = throughput.main(
        [
            "--models=small_cnn",
            "--frameworks=jax,torch",
            "--torch-variant=eager,channels_last",
            "--batch-size=16",
            "--steps=1",
            "--warmup=1",
            "--device=cpu",
            "--no-isolate",
            "--no-flops",
        ]
    )
    errors = [r["error"] for r in report["results"] if "error" in r]
    assert not errors, errors
    assert [(r["framework"], r["variant"]) for r in report["results"]] == [
        ("jax", None),
        ("torch", "eager"),
        ("torch", "channels_last"),
    ]
    assert [q["torch_variant"] for q in report["ratios"]] == ["eager", "channels_last"]
    for q, torch_r in zip(report["ratios"], report["results"][1:], strict=True):
        jax_r = report["results"][0]
        expected = jax_r["examples_per_s"] / torch_r["examples_per_s"]
        assert q["throughput_ratio_jax_over_torch"] == pytest.approx(expected, rel=1e-12)
    assert "torch (channels_last)" in capsys.readouterr().out


def test_torch_variant_flag_refuses_unknown():
    with pytest.raises(SystemExit):
        throughput.parse_args(["--torch-variant=eager,fast"])


# --------------------------------------------------------------------------- memory.py

memory = _load("memory")


def test_compiled_memory_reads_xla_buffer_sizes():
    import jax
    import jax.numpy as jnp

    x = jnp.ones(1000, jnp.float32)
    compiled = jax.jit(lambda x: 2 * x + 1, donate_argnums=0).lower(x).compile()
    m = throughput.compiled_memory(compiled)
    # One f32[1000] in, one out, written in place of the donated input.
    assert (m["argument"], m["output"], m["alias"]) == (4000, 4000, 4000)
    assert m["program_bytes"] == m["argument"] + m["output"] - m["alias"] + m["temp"]


def test_residual_bytes_counts_what_the_backward_pass_saves():
    import jax.numpy as jnp

    w = jnp.zeros(100, jnp.float32)
    assert memory.residual_bytes(lambda w: jnp.sum(jnp.sin(w)), w) == 400  # cos(w)
    assert memory.residual_bytes(lambda w: jnp.sum(jnp.sin(w)), w.astype(jnp.bfloat16)) == 200
    assert memory.residual_bytes(lambda w: jnp.sum(w * w), w) == 0  # only w, already there
    assert memory.residual_bytes(lambda w: jnp.sum(3.0 * w), w) == 0  # linear: nothing


def test_convolutions_by_dtype_reads_cpu_and_gpu_hlo():
    text = "\n".join(
        [
            "%a = f32[8,4,4,64]{3,2,1,0} convolution(%x, %w), window={size=3x3}",
            "%b = bf16[8,4,4,64]{3,2,1,0} convolution(%x, %w), window={size=3x3}",
            "%c = (bf16[8,4,4,64]{3,2,1,0}, u8[1024]{0}) custom-call(%x, %w), "
            'custom_call_target="__cudnn$convForward"',
            "%d = (f32[8,10]{1,0}, s8[0]{0}) custom-call(%x, %m), "
            'custom_call_target="__cublas$gemm"',
            "%e = f32[8,4,4,64]{3,2,1,0} add(%a, %a)",
        ]
    )
    assert memory.convolutions_by_dtype(text) == {"bf16": 2, "f32": 1}


def test_memory_analysis_small_cnn_cpu(tmp_path):
    out = tmp_path / "memory.json"
    report = memory.main(
        ["--model=small_cnn", "--batch-size=16", "--dtype=float32,bfloat16", f"--out={out}"]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [r["dtype"] for r in report["results"]] == ["float32", "bfloat16"]
    for r in report["results"]:
        c, a = r["compiled_memory"], r["analytic"]
        assert r["per_device_batch"] * r["devices_used"] == 16
        # The donated state is written in place: XLA's aliased bytes are the state's.
        assert c["alias"] == a["state"]
        # The state is parameters, momentum and BatchNorm statistics, plus a step and a key.
        assert 0 < a["state"] - (a["params"] + a["opt_state"] + a["model_state"]) < 1024
        assert a["state"] <= c["argument"] <= a["state"] + a["batch"]
        assert (
            c["temp"] > 0
            and c["program_bytes"] == c["argument"] + c["output"] - c["alias"] + c["temp"]
        )
        assert a["opt_state"] == a["params"] == a["grads"]  # SGD momentum: one f32 per param
        assert a["train_residuals"] > 0 and a["attack_residuals"] > 0
        assert sum(r["convolutions_by_dtype"].values()) > 0
    f32, bf16 = report["results"]
    assert set(f32["convolutions_by_dtype"]) == {"f32"}
    # Same parameters and optimizer at either compute dtype; lower-precision activations.
    assert f32["analytic"]["state"] == bf16["analytic"]["state"]
    assert bf16["analytic"]["attack_residuals"] < f32["analytic"]["attack_residuals"]
    ratios = report["ratios_float32_over_bfloat16"]
    assert ratios["temp"] == pytest.approx(
        f32["compiled_memory"]["temp"] / bf16["compiled_memory"]["temp"], rel=1e-12
    )
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # atomic writes


def test_memory_refuses_bad_input():
    with pytest.raises(SystemExit):
        memory.parse_args(["--dtype=float16"])
    with pytest.raises(SystemExit):
        memory.parse_args(["--batch-size=0"])
    with pytest.raises(SystemExit):
        memory.parse_args(["--model=vgg16"])


# --------------------------------------------------------------------------- scaling.py

scaling = _load("scaling")
autoattack_time = _load("autoattack_time")

_SMOKE = [
    "--models=small_cnn",
    "--batch-sizes=8,16",
    "--steps=1",
    "--warmup=1",
    "--aa-model=small_cnn",
    "--aa-points=8,16",
    "--aa-chunk-size=8",
    "--aa-version=custom",
    "--aa-attacks=apgd-ce,square",
    "--aa-n-iter=2",
    "--aa-n-queries=2",
    "--name=smoke",
]


def test_steps_per_epoch_and_failure_status():
    assert [scaling.steps_per_epoch(b) for b in (64, 128, 256, 512)] == [781, 390, 195, 97]
    assert scaling.steps_per_epoch(50_000) == 1 and scaling.steps_per_epoch(25_001) == 1
    oom = "jaxlib.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate"
    assert scaling.failure_status(oom) == "oom"
    assert scaling.failure_status("ValueError: batch size 12 does not split") == "error"


def test_scaling_cpu_smoke(tmp_path):
    report = scaling.main([*_SMOKE, "--no-isolate", f"--out-dir={tmp_path}"])
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert [(p["model"], p["batch_size"]) for p in saved["training"]] == [
        ("small_cnn", 8),
        ("small_cnn", 16),
    ]
    for p in saved["training"]:
        assert p["status"] == "ok", p.get("error")
        assert p["ms_per_step"] > 0 and p["examples_per_s"] > 0
        assert p["steps_per_epoch"] == 50_000 // p["batch_size"]
        expected = p["ms_per_step"] / 1e3 * p["steps_per_epoch"]
        assert p["seconds_per_epoch"] == pytest.approx(expected, rel=1e-12)
        assert p["compiled_memory"]["temp"] > 0
    assert [p["num_points"] for p in saved["autoattack"]] == [8, 16]
    for p in saved["autoattack"]:
        assert p["status"] == "ok", p.get("error")
        assert p["seconds"] > 0 and p["seconds_first_call"] > 0
        assert p["budget"] == {"attacks": ["apgd-ce", "square"], "n_iter": 2, "n_queries": 2}
    assert saved["settings"]["batch_sizes"] == [8, 16] and saved["host"]["cpu_count"] >= 1
    png = (tmp_path / "smoke.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # atomic writes


def test_scaling_without_matplotlib_keeps_the_json(tmp_path, monkeypatch, capsys):
    def no_matplotlib(report, path):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(scaling, "plot", no_matplotlib)
    args = [a for a in _SMOKE if not a.startswith("--batch-sizes")]
    scaling.main([*args, "--batch-sizes=8", "--no-isolate", f"--out-dir={tmp_path}"])
    assert json.loads((tmp_path / "smoke.json").read_text())["training"][0]["status"] == "ok"
    assert not (tmp_path / "smoke.png").exists()
    captured = capsys.readouterr()
    assert "no plot" in captured.err and "--replot" in captured.err
    assert "| small_cnn | 8 | ok |" in captured.out


def test_scaling_records_timeouts_and_still_plots(tmp_path):
    # A child cannot even import JAX in 0.3 s: every point times out, none crashes the run.
    report = scaling.main(
        [
            *_SMOKE,
            "--batch-sizes=8",
            "--aa-points=8",
            "--child-timeout=0.3",
            f"--out-dir={tmp_path}",
        ]
    )
    points = report["training"] + report["autoattack"]
    assert [p["status"] for p in points] == ["timeout", "timeout"]
    assert all("timed out after 0.3 s" in p["error"] for p in points)
    assert json.loads((tmp_path / "smoke.json").read_text())["training"][0]["status"] == "timeout"
    assert (tmp_path / "smoke.png").read_bytes()[:4] == b"\x89PNG"
    # --replot redraws the figure from the JSON alone.
    (tmp_path / "smoke.png").unlink()
    scaling.main(["--replot", str(tmp_path / "smoke.json")])
    assert (tmp_path / "smoke.png").exists()


def test_scaling_isolated_point_runs_in_its_own_process(tmp_path):
    report = scaling.main(
        [*_SMOKE, "--batch-sizes=8", "--aa-points=", "--child-timeout=300", f"--out-dir={tmp_path}"]
    )
    (point,) = report["training"]
    assert point["status"] == "ok", point.get("error")
    assert point["isolated"] and point["ms_per_step"] > 0 and report["autoattack"] == []
    assert point["framework_info"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"  # the child's env


def test_scaling_records_a_failed_point_instead_of_raising():
    args = scaling.parse_args(_SMOKE)
    # 12 examples do not split over the suite's 8 simulated devices.
    point = scaling.train_point("small_cnn", 12, args)
    assert point["status"] == "error" and "does not split over 8 devices" in point["error"]


@pytest.mark.parametrize(
    "bad",
    [
        ["--batch-sizes=0,64"],
        ["--batch-sizes=64,big"],
        ["--models=small_cnn,vgg"],
        ["--aa-points=-5"],
        ["--aa-n-iter=3"],  # a budget without --aa-version custom
        ["--aa-version=custom", "--aa-n-queries=0"],
        ["--models=", "--aa-points="],  # nothing to measure
        ["--steps=0"],
        ["--child-timeout=nan"],
        ["--name=a/b"],
    ],
)
def test_scaling_refuses_bad_input(bad, capsys):
    with pytest.raises(SystemExit):
        scaling.parse_args(bad)
    assert "error:" in capsys.readouterr().err


def test_autoattack_custom_budget():
    assert autoattack_time.custom_budget("standard", None, None, None, None) is None
    assert autoattack_time.custom_budget("custom", "apgd-ce, fab-t", 3, None, 2) == {
        "attacks": ("apgd-ce", "fab-t"),
        "n_iter": 3,
        "n_target_classes": 2,
    }
    with pytest.raises(ValueError, match="--version custom"):
        autoattack_time.custom_budget("standard", None, 10, None, None)
    with pytest.raises(ValueError, match=">= 1"):
        autoattack_time.custom_budget("custom", None, 0, None, None)


def test_wide_resnet_is_wrn_34_10_and_jax_only():
    assert throughput.MODEL_KWARGS["wide_resnet"] == {"depth": 34, "width": 10}
    with pytest.raises(SystemExit):
        throughput.parse_args(["--models=wide_resnet", "--frameworks=jax,torch"])
    assert throughput.parse_args(["--models=wide_resnet", "--frameworks=jax"]).models == [
        "wide_resnet"
    ]


def test_train_throughput_without_torch_says_skipped(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "torch" else real_find_spec(name, *a),
    )
    report = throughput.main(
        ["--models=small_cnn", "--frameworks=torch", "--device=cpu", "--no-isolate", "--steps=1"]
    )
    (r,) = report["results"]
    assert r["skipped"] and r["error"] == "skipped: torch not installed"
    assert report["ratios"] == []
    captured = capsys.readouterr()
    assert "skipped: torch not installed" in captured.out and "failed" not in captured.out


# --------------------------------------------------------------------------- eval_throughput.py

evalbench = _load("eval_throughput")
transfer = _load("weight_transfer")

# A smoke-test size: PGD-2 and AutoAttack's four attacks with 2 iterations and 20
# Square queries, on the small CNN; batches of 8 split over the 8 simulated devices.
_TINY_EVAL = [
    "--models=small_cnn",
    "--device=cpu",
    "--pgd-points=16",
    "--aa-points=8",
    "--batch-size=8",
    "--pgd-steps=2",
    "--aa-iters=2",
    "--aa-queries=20",
    "--repeats=1",
    "--aa-repeats=1",
]


def test_eval_throughput_jax_side_and_torch_recorded_as_skipped(tmp_path, monkeypatch, capsys):
    # As on CI, whatever is installed here: `import torch` fails.
    monkeypatch.setitem(sys.modules, "torch", None)
    out = tmp_path / "eval.json"
    report = evalbench.main([*_TINY_EVAL, f"--out={out}"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = {(r["part"], r["framework"]): r for r in report["results"]}
    assert set(rows) == {
        ("pgd", "jax"),
        ("pgd", "torch"),
        ("autoattack", "jax"),
        ("autoattack", "torch (autoattack package)"),
    }
    for key in [("pgd", "torch"), ("autoattack", "torch (autoattack package)")]:
        assert rows[key]["skipped"] == "skipped: torch not installed"
    assert report["ratios"] == []
    assert report["versions"]["torch"] == "skipped: torch not installed"
    assert {"jax", "jaxlib", "flax"} <= set(report["versions"])
    assert report["command"].startswith("python benchmarks/eval_throughput.py --models=small_cnn")
    load = report["host"]["load_average_1_5_15_min_before"]
    assert load is None or (len(load) == 3 and min(load) >= 0)

    pgd = rows[("pgd", "jax")]
    assert "error" not in pgd, pgd.get("error")
    assert pgd["attack"] == "PGD-2" and pgd["points"] == 16 and pgd["devices_used"] == 8
    assert pgd["examples_per_s"] == pytest.approx(16 / pgd["steady_median_s"], rel=1e-12)
    assert pgd["first_call_s"] > 0 and len(pgd["runs"]) == 2  # first call, 1 repeat
    assert all(r["cpu_s"] > 0 for r in pgd["runs"])
    # plain mode: labels are the clean predictions, so every point starts correct.
    assert pgd["clean_accuracy"] == 1.0
    assert 0.0 <= pgd["robust_accuracy"] <= pgd["clean_accuracy"]

    aa = rows[("autoattack", "jax")]
    assert "error" not in aa, aa.get("error")
    assert aa["mode"] == "worst_case" and aa["attack"].startswith("AutoAttack (2 iterations")
    # worst_case: no attack can break a point, and every output passed the checks.
    assert aa["clean_accuracy"] == 1.0 and aa["robust_accuracy"] == 1.0
    for run in aa["runs"]:
        assert list(run["accuracy_after_each_attack"]) == ["clean", *evalbench.AUTOATTACK_ATTACKS]
        assert set(run["accuracy_after_each_attack"].values()) == {1.0}
        assert {k: v for k, v in run["checks"].items() if k != "max_perturbation"} == {
            "outside_eps": 0,
            "outside_box": 0,
            "nonfinite": 0,
            "flag_mismatch": 0,
        }
        # The attacks take (nearly) all of the run's time.
        assert sum(run["seconds_per_attack"].values()) <= run["total_s"]
    assert aa["seconds_per_1000_points"] == pytest.approx(
        1000 * aa["runs"][1]["total_s"] / 8, rel=1e-12
    )
    text = capsys.readouterr().out
    assert "skipped: torch not installed" in text and "| small_cnn | PGD-2 | jax |" in text


def test_eval_throughput_refuses_bad_input_before_compiling(tmp_path):
    for bad in (
        ["--pgd-points=0"],
        ["--aa-batch-size=-8"],
        ["--models=small_cnn,vgg"],
        ["--parts=pgd,cw"],
        ["--aa-mode=average"],
        ["--autoattack-commit=HEAD"],
    ):
        with pytest.raises(SystemExit):
            evalbench.parse_args(bad)
    out = tmp_path / "never.json"
    # 12 points per batch do not split over the 8 simulated devices.
    with pytest.raises(ValueError, match="--aa-batch-size 12 does not split.*multiples of 8"):
        evalbench.main(["--device=cpu", "--aa-batch-size=12", f"--out={out}"])
    assert not out.exists()


def test_worst_case_wrapper_is_the_documented_affine_map():
    import jax.numpy as jnp

    def apply_fn(variables, images, train):
        return images.reshape(len(images), -1)[:, :10] * variables["w"], {}

    x, w = jnp.arange(20.0).reshape(2, 10), jnp.float32(3.0)
    wrapped = evalbench.attacked_apply_fn(apply_fn, "worst_case")
    expected = 1e-3 * 3.0 * np.arange(20.0).reshape(2, 10)
    expected[:, 0] += 100.0
    # Two float32 roundings (the scale, the shift) of values up to 100.
    np.testing.assert_allclose(
        wrapped({"w": w}, x, False)[0], expected, rtol=0, atol=2 * F32_EPS * 100
    )
    assert evalbench.attacked_apply_fn(apply_fn, "plain") is apply_fn
    with pytest.raises(ValueError, match="accepted: plain, worst_case"):
        evalbench.attacked_apply_fn(apply_fn, "mild")


def _small_cnn_variables():
    import jax

    from jax_memat.models import get_model, init_model

    return init_model(get_model("small_cnn", 10), jax.random.key(0), (28, 28, 1))


def test_weight_transfer_layouts_without_torch():
    import jax

    variables = _small_cnn_variables()
    arrays = transfer.torch_state_arrays("small_cnn", variables)
    params, stats = variables["params"], variables["batch_stats"]
    # HWIO -> OIHW, [in, out] -> [out, in].
    np.testing.assert_array_equal(
        arrays["conv2.weight"], np.transpose(params["conv2"]["kernel"], (3, 2, 0, 1))
    )
    np.testing.assert_array_equal(arrays["linear.weight"], np.asarray(params["linear"]["kernel"]).T)
    np.testing.assert_array_equal(arrays["bn2.running_var"], stats["bn2"]["var"])
    np.testing.assert_array_equal(arrays["bn1.weight"], params["bn1"]["scale"])
    # fc1: the same 4x4x64 map flattened as each framework does gives the same product.
    # Integer-valued entries keep every sum exact, whatever the order.
    rng = np.random.default_rng(0)
    fmap = rng.integers(-3, 4, size=(4, 4, 64)).astype(np.float32)
    kernel = rng.integers(-3, 4, size=(4 * 4 * 64, 128)).astype(np.float32)
    arrays = transfer.torch_state_arrays(
        "small_cnn", {**variables, "params": {**params, "fc1": {**params["fc1"], "kernel": kernel}}}
    )
    np.testing.assert_array_equal(
        arrays["fc1.weight"] @ fmap.transpose(2, 0, 1).reshape(-1), fmap.reshape(-1) @ kernel
    )
    n_flax = sum(np.size(v) for v in jax.tree.leaves(variables))
    n_torch = sum(v.size for k, v in arrays.items() if not k.endswith("num_batches_tracked"))
    assert n_torch == n_flax  # every Flax value went somewhere, once
    with pytest.raises(ValueError, match="accepted: preact_resnet18, resnet18, small_cnn"):
        transfer.torch_state_arrays("vgg16", variables)
    with pytest.raises(ValueError, match="no batch_stats mean and var"):
        transfer.torch_state_arrays("small_cnn", {"params": params})


def _randomized(variables, seed):
    """Every BatchNorm value and bias away from its initial 0 / 1, so a mixed-up field shows."""
    import jax

    rng = np.random.default_rng(seed)

    def draw(path, x):
        name, shape = path[-1].key, np.shape(x)
        if name == "var":
            return rng.uniform(0.5, 2.0, shape).astype(np.float32)
        if name == "scale":
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        if name in ("mean", "bias"):
            return rng.normal(0.0, 0.2, shape).astype(np.float32)
        return np.asarray(x)

    return jax.tree_util.tree_map_with_path(draw, variables)


@pytest.mark.parametrize("name", ["small_cnn", "preact_resnet18", "resnet18"])
def test_weight_transfer_gives_the_same_logits(name):
    torch = pytest.importorskip("torch")
    import jax
    import torch_baseline

    from jax_memat.models import get_model, init_model, make_apply_fn

    shape = throughput.image_shape(name)
    module = get_model(name, 10)
    variables = _randomized(init_model(module, jax.random.key(1), shape), seed=2)
    x = np.random.default_rng(3).uniform(size=(4, *shape)).astype(np.float32)
    expected = np.asarray(jax.jit(lambda v, x: make_apply_fn(module)(v, x, False)[0])(variables, x))
    net = transfer.load_into_torch(torch_baseline.get_model(name), name, variables).eval()

    def torch_logits(model):
        with torch.no_grad():
            return model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()

    # float32 round-off grows with depth: a few ulps of the largest logit per layer
    # (conv and dense layers: 4 in the small CNN, 21 in the ResNets), times 16. Measured
    # on an AMD EPYC: 2 (small CNN), 6 and 14 (ResNets) ulps of the largest logit.
    layers = sum(
        1
        for path, _ in jax.tree_util.tree_leaves_with_path(variables["params"])
        if path[-1].key == "kernel"
    )
    tol = 16 * layers * np.finfo(np.float32).eps * np.abs(expected).max()
    assert np.abs(torch_logits(net) - expected).max() <= tol
    if name == "small_cnn":
        # The check can fail: fc1's rows left in Flax's (h, w, c) order are far off.
        arrays = transfer.torch_state_arrays(name, variables)
        kernel = np.asarray(variables["params"]["fc1"]["kernel"])
        arrays["fc1.weight"] = np.ascontiguousarray(kernel.T)
        wrong = torch_baseline.get_model(name)
        wrong.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
        assert np.abs(torch_logits(wrong.eval()) - expected).max() > 100 * tol


def test_weight_transfer_refuses_another_architecture():
    pytest.importorskip("torch")
    import torch_baseline

    with pytest.raises(ValueError, match="PyTorch entries without a Flax value"):
        transfer.load_into_torch(
            torch_baseline.get_model("preact_resnet18"), "small_cnn", _small_cnn_variables()
        )


def test_eval_throughput_against_torch_and_the_reference_autoattack(capsys):
    pytest.importorskip("torch")
    pytest.importorskip("autoattack")  # the reference package, never a dependency
    report = evalbench.main([*_TINY_EVAL, "--frameworks=jax,torch"])
    errors = [r["error"] for r in report["results"] if "error" in r]
    assert not errors, errors
    rows = {(r["part"], r["framework"]): r for r in report["results"]}
    weights = rows[("pgd", "jax")]["weights_check"]
    assert weights["same_predictions"] == weights["points"] == 8
    # 16 roundings of the largest logit per layer (4 layers), as the converter test.
    bound = 64 * F32_EPS * max(1.0, weights["max_abs_logit"])
    assert weights["max_abs_logit_difference"] <= bound
    pgd_jax, pgd_torch = rows[("pgd", "jax")], rows[("pgd", "torch")]
    # Same weights, same labels: both see every point correct before the attack.
    assert pgd_jax["clean_accuracy"] == pgd_torch["clean_accuracy"] == 1.0
    # Random starts differ between the frameworks, so only the rates agree, loosely
    # on 16 points.
    assert abs(pgd_jax["robust_accuracy"] - pgd_torch["robust_accuracy"]) <= 0.25
    ref = rows[("autoattack", "torch (autoattack package)")]
    run = ref["runs"][-1]
    assert run["accuracy_after_each_attack"] == {
        "clean": 1.0,
        **dict.fromkeys(evalbench.AUTOATTACK_ATTACKS, 1.0),
    }
    assert sum(run["seconds_per_attack"].values()) == pytest.approx(run["total_s"], rel=1e-9)
    assert all(run["seconds_per_attack"][a] > 0 for a in evalbench.AUTOATTACK_ATTACKS)
    by_part = {q["part"]: q for q in report["ratios"]}
    assert by_part["autoattack"]["robust_accuracy_jax"] == 1.0
    assert by_part["autoattack"]["robust_accuracy_torch"] == 1.0
    assert by_part["autoattack"]["throughput_ratio_jax_over_torch"] == pytest.approx(
        ref["seconds_per_1000_points"] / rows[("autoattack", "jax")]["seconds_per_1000_points"],
        rel=1e-12,
    )
    assert by_part["pgd"]["throughput_ratio_jax_over_torch"] == pytest.approx(
        pgd_jax["examples_per_s"] / pgd_torch["examples_per_s"], rel=1e-12
    )
    assert "| small_cnn | PGD-2 | torch |" in capsys.readouterr().out
