"""scripts/profile_step.py on a tiny model: the trace is read, joined with the compiled program's
metadata and summed. Nothing about speed is asserted."""

import importlib.util
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
spec = importlib.util.spec_from_file_location("profile_step_script", REPO / "scripts" / "profile_step.py")
prof = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = prof
spec.loader.exec_module(prof)


def tiny_config():
    config = prof.bench.model_config("tiny")
    config.model.hidden_dims = (8, 8)
    config.data.image_size = 4
    return config


def test_module_kind_and_hlo_parsing():
    assert prof.module_kind("jit(s)/transpose(jvp(UNet))/up_2_attn/bhtd,hdc->btc/dot_general") == "attn"
    assert prof.module_kind("jit(s)/jvp(UNet)/down_0_res_1/conv1/conv_general_dilated") == "conv"
    assert prof.module_kind("jit(s)/jvp(UNet)/mid_res_0/norm2/reduce_sum") == "norm"
    assert prof.module_kind("jit(s)/adam/mul") == "other"
    compiled = jax.jit(lambda x: jnp.sin(x) @ x.T).lower(jnp.ones((4, 4))).compile()
    info = prof.hlo_op_info(compiled.as_text())
    assert any(op.opcode in ("dot", "fusion") and op.shape.startswith("f32[4,4]") for op in info.values())


@pytest.mark.parametrize("part", ["train", "forward"])
def test_profile_reads_a_real_trace(part):
    lines = []
    opts = prof.bench.Options(train_batch=8)  # a multiple of the 8 simulated devices
    summary = prof.profile(tiny_config(), opts, part=part, steps=2, top=10, log=lines.append)
    assert summary["wall_ms"] > 0 and summary["total_ms"] > 0
    assert 0 < len(summary["ops"]) <= 10 and len(summary["groups"]) <= 10
    # Every row is an instruction of the compiled program, with its shape; loops are not rows.
    assert all(op.shape.startswith(("f32", "(", "s32", "u32", "pred")) for _, _, op in summary["ops"])
    assert not any(op.opcode == "while" for _, _, op in summary["ops"])
    passes = {key[0] for _, _, key in summary["groups"]}
    assert ("backward" in passes) == (part == "train")
    assert lines[0].startswith(f"{part}: batch 8") and any("by pass" in line for line in lines)
