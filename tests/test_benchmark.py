"""scripts/benchmark.py on a tiny model with very few iterations: numbers exist, are finite and
positive, and the JSON has its keys. Speed is never asserted."""

import copy
import dataclasses
import importlib.util
import json
import math
import sys

import jax
import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("benchmark_script", REPO / "scripts" / "benchmark.py")
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench  # dataclasses look their module up while the class is built
spec.loader.exec_module(bench)

OPTS = bench.Options(train_batch=8, sample_batch=2, sample_steps=2, train_iters=2, sample_iters=1,
                     repeats=2, torch_threads=1)


def tiny_config():
    config = bench.model_config("tiny")
    config.model.hidden_dims = (8, 8)  # one stage: the fastest network to compile
    config.data.image_size = 4
    return config


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def jax_result():
    return bench.benchmark(tiny_config(), OPTS, model_name="tiny", peer=False, log=lambda s: None)


def test_jax_numbers_are_finite_and_positive(jax_result):
    train, sampling = jax_result["jaxdiff"]["train"], jax_result["jaxdiff"]["sampling"]
    for part in (train, sampling):
        for key in ("images_per_sec", "compile_seconds", "flops_per_image", "tflops", "compiled_bytes"):
            assert positive(part[key]), (key, part[key])
        assert part["mfu"] is None  # CPUs have no peak in the table
    assert train["num_devices"] == jax.local_device_count() == 8  # the mesh spans all devices
    assert len(train["step_seconds_windows"]) == OPTS.repeats
    assert math.isfinite(train["final_loss"]) and sampling["images_finite"]
    # A train step (forward + backward + AdamW) costs more than one forward pass.
    assert train["flops_per_image"] > sampling["flops_per_image"] / OPTS.sample_steps
    assert train["num_params"] > 1000


def test_json_and_table(jax_result):
    decoded = json.loads(json.dumps(jax_result, default=str))
    assert {"machine", "model", "options", "jaxdiff", "image_size", "hidden_dims"} <= set(decoded)
    assert {"cpu", "backend", "device_kind", "num_local_devices", "jax"} <= set(decoded["machine"])
    assert decoded["options"]["train_batch"] == 8 and decoded["options"]["cpu_fusion"] == "auto"
    assert {"train", "sampling"} == set(decoded["jaxdiff"])
    table = bench.format_table(jax_result)
    assert "train images/s" in table and "DDIM images/s" in table and decoded["machine"]["cpu"] in table


def test_peer_and_ratios(jax_result):
    pytest.importorskip("diffusers")
    pytest.importorskip("torch")
    result = bench.add_peer(copy.deepcopy(jax_result), tiny_config(), OPTS)
    peer = result["peer"]
    assert peer["model"] == "diffusers.UNet2DModel"
    for part in ("train", "sampling"):
        for key in ("images_per_sec", "flops_per_image", "tflops"):
            assert positive(peer[part][key]), (part, key, peer[part][key])
    assert peer["train"]["torch_threads"] == 1 and peer["train"]["num_params"] > 1000
    assert set(result["ratios"]) == {f"{p}_{m}" for p in ("train", "sampling") for m in ("images_per_sec", "tflops")}
    assert all(positive(v) for v in result["ratios"].values())
    assert "jaxdiff/peer" in bench.format_table(result)


def test_peer_config_builds_a_diffusers_unet_of_the_same_widths():
    pytest.importorskip("diffusers")
    from diffusers import UNet2DModel

    config = bench.model_config("small")
    kwargs = bench.peer_unet_kwargs(config)
    assert kwargs["block_out_channels"] == (16, 32, 64, 128)
    assert kwargs["down_block_types"][2] == "AttnDownBlock2D" and kwargs["up_block_types"][-1] == "AttnUpBlock2D"
    model = UNet2DModel(**kwargs)
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 5e6


def test_sweep_variants_change_one_option_each():
    base = bench.Options()
    variants = bench.sweep_variants(base)
    changed = [v.changed(base) for v in variants]
    assert all(c for c in changed)
    assert all(len(c) == 1 or set(c) == {"train_batch", "sample_batch"} for c in changed)
    assert {"dtype", "donate", "remat", "attention_impl", "cpu_fusion"} <= {k for c in changed for k in c}


def test_peak_table():
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
    assert bench.peak_tflops("NVIDIA H200", "float32") == 67.0
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB", "float32") == 19.5
    assert bench.peak_tflops("TPU v5 lite", "bfloat16") == 197.0
    assert bench.peak_tflops("TPU v5p", "bfloat16") == 459.0
    assert bench.peak_tflops("cpu", "float32") is None
    opts = dataclasses.replace(OPTS, dtype="bfloat16")
    assert bench.with_options(tiny_config(), opts).model.dtype == "bfloat16"


def test_book_peer_computes_the_same_function_as_our_unet():
    torch = pytest.importorskip("torch")
    import numpy as np

    from jaxdiff.models import unet_params_to_torch
    from jaxdiff.train import build_model

    config = bench.model_config("tiny")
    config.model.hidden_dims, config.data.image_size = (8, 8, 8), 4  # space-to-depth, upsampling, attention
    model = build_model(config)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 4, 1)).astype(np.float32)
    t = np.array([3, 900], np.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)  # random params without compiling init
    variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32) * 0.3, shapes)
    ours = np.asarray(jax.jit(model.apply)(variables, x, t))
    net = bench.book_unet_torch(model)
    state = {k: torch.from_numpy(np.array(v)) for k, v in unet_params_to_torch(variables["params"], model).items()}
    net.load_state_dict(state, strict=True)
    with torch.no_grad():
        theirs = net(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)


def test_attention_ablation_removes_the_kernels_and_restores_them():
    import numpy as np

    from jaxdiff.train import build_model

    config = bench.model_config("tiny")
    x = jax.numpy.ones((2, 8, 8, 1)) * 0.3
    t = jax.numpy.array([10, 900])
    params = jax.jit(build_model(config).init)(jax.random.key(0), x, t)
    forward = lambda: np.asarray(jax.jit(build_model(config).apply)(params, x, t))  # noqa: E731 (traced anew)
    before = forward()
    with bench._without_attention_kernels():
        ablated = forward()
        if importlib.util.find_spec("torch") is not None:
            import torch

            v = torch.randn(1, 2, 4, 3)
            assert torch.equal(torch.nn.functional.scaled_dot_product_attention(v, v, v), v)
    assert not np.allclose(before, ablated, atol=1e-4)
    np.testing.assert_array_equal(forward(), before)
    if importlib.util.find_spec("torch") is not None:
        import torch

        q = torch.randn(1, 2, 4, 3)
        assert not torch.allclose(torch.nn.functional.scaled_dot_product_attention(q, q, q), q)


def test_attention_share_numbers():
    opts = dataclasses.replace(OPTS, train_iters=1)
    share = bench.attention_share(tiny_config(), opts, rounds=1,
                                  peer=importlib.util.find_spec("torch") is not None)
    for side, ms in share.items():
        assert positive(ms["step"]) and positive(ms["without_attention"]), (side, ms)
        assert ms["attention"] == pytest.approx(ms["step"] - ms["without_attention"])
