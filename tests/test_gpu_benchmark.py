"""scripts/gpu_benchmark.py on CPU with a tiny model: the largest-batch estimate holds for the
batch it picks, runs are recorded as they finish (failures and skips too), the goals compare
like with like. Speed is never asserted."""

import dataclasses
import importlib.util
import json
import math
import sys

import pytest
from conftest import REPO
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(REPO / "scripts"))
spec = importlib.util.spec_from_file_location("gpu_benchmark_script", REPO / "scripts" / "gpu_benchmark.py")
gb = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = gb
spec.loader.exec_module(gb)
bench = gb.bench

SETTINGS = gb.Settings(train_batch=8, sample_batch=2, sample_steps=2, window_seconds=0.05, repeats=1,
                       peers=("book",))


def tiny_config():
    config = bench.model_config("tiny")
    config.model.hidden_dims = (8, 8)
    config.data.image_size = 4
    return config


def test_largest_batch_fits_the_memory_it_was_given():
    memory = 2**20  # a tiny model at 4x4: a few KiB per image, ~330 KiB fixed
    batch, fit = gb.largest_batch(tiny_config(), bench.Options(), memory, fraction=0.8, probe=(8, 64))
    assert batch % 8 == 0 and 8 < batch < 1024  # not the smallest, not capped
    checked = {int(k): v for k, v in fit["checked_bytes"].items()}
    assert list(checked)[-1] == batch and fit["bytes"] == checked[batch] <= 0.8 * memory


@given(fixed=st.integers(0, 10**6), per_image=st.integers(1, 10**4), bend=st.floats(0.0, 2.0),
       budget=st.integers(10**4, 10**8))
def test_search_batch_finds_a_fitting_batch_close_to_the_largest(fixed, per_image, bend, budget):
    # Affine plus a convex bend, like XLA's footprints: the line through the probes underestimates.
    measure = lambda b: fixed + per_image * b * (1 + bend * b / 1024)  # noqa: E731
    fits = [b for b in range(8, 1025, 8) if measure(b) <= budget]
    if not fits:
        with pytest.raises(RuntimeError, match="No batch of 8 or more fits"):
            gb.search_batch(measure, budget, probe=(8, 16), tries=8)
        return
    batch, fit = gb.search_batch(measure, budget, probe=(8, 16), tries=8)
    assert batch % 8 == 0 and measure(batch) <= budget and fit["bytes"] == measure(batch)
    assert batch >= 0.5 * max(fits)  # shrinking by its own bytes per image overshoots at most 2x


def test_run_all_records_each_run_as_it_finishes(tmp_path):
    settings = dataclasses.replace(SETTINGS, max_batch=16)
    results = gb.run_all(tiny_config(), ["float32_b4", "bfloat16_max"], settings, tmp_path,
                         model_name="tiny", log=lambda s: None)
    lines = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert "header" in lines[0] and lines[0]["header"]["model"] == "tiny"
    assert [r["run"] for r in lines[1:]] == ["float32_b4", "bfloat16_max"]
    first = results[0]
    assert first["options"]["train_batch"] == 8 and first["options"]["dtype"] == "float32"
    assert results[1]["options"]["train_batch"] == 16 and results[1]["options"]["dtype"] == "bfloat16"
    train = first["jaxdiff"]["train"]
    assert math.isfinite(train["images_per_sec"]) and train["images_per_sec"] > 0
    assert train["steps_per_window"] >= 2
    assert first["jaxdiff"]["sampling"]["images_finite"]
    assert "sampling" not in results[1]["jaxdiff"]  # "_max" runs time training only
    if importlib.util.find_spec("torch") is not None:
        peer = first["peers"]["book"]["peer"]["train"]
        assert peer["images_per_sec"] > 0 and "peers" not in results[1]  # bfloat16: no peer
    summary = (tmp_path / "summary.md").read_text()
    assert "| float32_b4 | 8 |" in summary and "| bfloat16_max | 16 |" in summary


def test_failed_and_skipped_runs_are_recorded_and_the_rest_go_on(tmp_path):
    # On CPU the device reports no memory limit: the "_max" run fails with that reason; a
    # zero-second budget then skips what is left.
    settings = dataclasses.replace(SETTINGS, peers=())
    results = gb.run_all(tiny_config(), ["float32_max", "float32_b4"], settings, tmp_path,
                         model_name="tiny", log=lambda s: None)
    assert "no memory limit" in results[0]["error"] and "jaxdiff" in results[1]
    skipped = gb.run_all(tiny_config(), ["float32_b4"], dataclasses.replace(settings, budget_s=1e-9),
                         tmp_path / "b", model_name="tiny", log=lambda s: None)
    assert "time budget" in skipped[0]["skipped"]
    assert "float32_max: RuntimeError" in (tmp_path / "summary.md").read_text()
    with pytest.raises(ValueError, match="float64_b4"):
        gb.run_all(tiny_config(), ["float64_b4"], settings, tmp_path, model_name="tiny")


def _result(run, dtype, batch, ips, mfu=None, peer_ips=None, ddim_s=None, sample_batch=10):
    r = {"run": run, "options": {"dtype": dtype, "train_batch": batch, "sample_batch": sample_batch,
                                 "sample_steps": 50},
         "jaxdiff": {"train": {"images_per_sec": ips, "mfu": mfu}}}
    if peer_ips is not None:
        r["peers"] = {"diffusers": {"peer": {"train": {"images_per_sec": peer_ips}}}}
    if ddim_s is not None:
        r["jaxdiff"]["sampling"] = {"loop_seconds": ddim_s}
    return r


def test_goals_compare_with_the_float32_peer_at_the_same_batch():
    results = [_result("float32_b4", "float32", 4, 90.0, peer_ips=30.0, ddim_s=1.5),
               _result("bfloat16_b4", "bfloat16", 4, 150.0, mfu=0.35, ddim_s=0.8),
               _result("float32_max", "float32", 64, 500.0, peer_ips=200.0),
               _result("bfloat16_max", "bfloat16", 64, 900.0, mfu=0.45)]
    rows = {g["goal"]: g for g in gb.goals(results)}
    assert rows["training float32 batch 4 / diffusers float32"]["value"] == pytest.approx(3.0)
    assert rows["training float32 batch 4 / diffusers float32"]["met"]
    assert rows["training bfloat16 batch 4 / diffusers float32"]["value"] == pytest.approx(5.0)
    assert rows["training float32 batch 64 / diffusers float32"]["value"] == pytest.approx(2.5)
    assert not rows["training float32 batch 64 / diffusers float32"]["met"]
    assert rows["training bfloat16 batch 64 / diffusers float32"]["value"] == pytest.approx(4.5)
    assert not rows["MFU bfloat16 training batch 4"]["met"] and rows["MFU bfloat16 training batch 64"]["met"]
    assert not rows["DDIM-50 of 10 images, float32, seconds"]["met"]
    assert rows["DDIM-50 of 10 images, bfloat16, seconds"]["met"]
    # Another sampling batch is not the goal's figure.
    assert not any("DDIM" in g["goal"] for g in gb.goals([_result("x", "float32", 4, 1.0, ddim_s=0.1,
                                                                  sample_batch=2)]))
