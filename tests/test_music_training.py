"""Music training through the shared loop: data windows, the loss, config checks, a tiny run that
resumes exactly, and scripts/generate_music.py's library function."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pretty_midi
import pytest
import torch
from conftest import load_config

from jaxdiff import builders, music
from jaxdiff import train as train_lib
from jaxdiff.music import data as music_data
from jaxdiff.music import training as music_training
from jaxdiff.music.continuation import continue_midi
from jaxdiff.music.reference_torch import book_loss, book_model

END, PAD = music.END_ID, music.PAD_ID


def test_windows_follow_the_books_padding():
    ids = np.arange(10, dtype=np.int32)
    x, y = music_data.make_pair(ids, 0, 4)  # a full window: no end, no pad
    assert x.tolist() == [0, 1, 2, 3] and y.tolist() == [1, 2, 3, 4]
    x, y = music_data.make_pair(ids, 0, 12)  # shorter piece: x = ids + pads; y = ids[1:] + end + pads
    assert x.tolist() == list(range(10)) + [PAD, PAD] and y.tolist() == list(range(1, 10)) + [END, PAD, PAD]
    x, y = music_data.make_pair(ids, 0, 10)  # exactly seq_len events: the end is the last target
    assert x.tolist() == list(range(10)) and y.tolist() == list(range(1, 10)) + [END]
    assert music_data.window_offsets(10, 4, 0) == [0]  # the book: the first window only
    assert music_data.window_offsets(10, 4, 3) == [0, 3, 6]  # the last one ends with the piece
    assert music_data.window_offsets(11, 4, 3) == [0, 3, 6, 7]
    assert music_data.window_offsets(3, 4, 3) == [0]
    source = music_data.WindowSource([music_data.Piece("a", ids), music_data.Piece("b", ids[:3])], 4, 3)
    assert len(source) == 4 and source[3]["targets"].tolist() == [1, 2, END, PAD]
    log_p = music_data.unigram_log_probs([music_data.Piece("a", np.array([5, 5, 7], np.int32))])
    assert np.isneginf(log_p[PAD]) and np.isclose(np.exp(log_p).sum(), 1.0) and log_p[5] > log_p[7] > log_p[8]


def test_loss_is_pytorchs_cross_entropy_ignoring_pad():
    torch.manual_seed(0)
    net = book_model(num_layers=1, num_heads=2, embed_dim=16, max_len=32).eval()
    model = music.MusicTransformer(num_layers=1, num_heads=2, embed_dim=16, max_len=32)
    params = music.music_params_from_torch(net.state_dict())
    rng = np.random.default_rng(0)
    x = rng.integers(0, 388, (3, 20)).astype(np.int32)
    y = rng.integers(0, 389, (3, 20)).astype(np.int32)
    y[1, 12:] = PAD  # a short piece's padding is not counted
    y[2, 5] = END
    loss, count = music_training.music_loss(params, {"inputs": x, "targets": y}, None, model=model, train=False)
    with torch.no_grad():
        expected = book_loss(net(torch.from_numpy(x).long()), torch.from_numpy(y).long()).item()
    assert int(count) == 60 - 8
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


@pytest.mark.parametrize("field, value", [
    ("model.embed_dim", 31), ("model.vocab_size", 388), ("data.seq_len", 100), ("sample.num_tokens", 60),
    ("data.name", "digits"), ("sample.temperature", 0.0), ("optim.schedule", "linear"), ("task", "speech"),
])  # fmt: skip
def test_bad_music_fields_are_named(field, value):
    config = load_config("music", "smoke")
    node, leaf = config, field
    if "." in field:
        section, leaf = field.split(".")
        node = config[section]
    node[leaf] = value
    with pytest.raises(ValueError, match=f"config.{field}="):
        builders.validate_config(config, num_devices=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny music runs on ten chorales: 6 steps straight, and 4 steps then resumed to 6."""
    root = tmp_path_factory.mktemp("music_runs")
    config = load_config("music", "smoke")
    config.data.cache_dir = str(root / "cache")
    config.train.sample_every = 4
    config.optim.schedule = "constant"  # the 4-step run's learning rates are then the 6-step run's
    straight = train_lib.train_and_evaluate(config, root / "straight")
    first = config.copy_and_resolve_references()
    first.train.num_steps = 4
    train_lib.train_and_evaluate(first, root / "resumed")
    resumed = train_lib.train_and_evaluate(config, root / "resumed")
    return root, config, straight, resumed


def test_music_run_resumes_exactly_and_reports(runs):
    root, config, straight, resumed = runs
    assert int(straight.step) == int(resumed.step) == 6
    for a, b in zip(jax.tree.leaves(jax.device_get(straight)), jax.tree.leaves(jax.device_get(resumed))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    records = [json.loads(line) for line in (root / "straight" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    assert all(np.isfinite(r["loss"]) and r["tokens_per_sec"] > 0 for r in train_records)
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 6]
    assert all(np.isfinite(r["val_loss"]) and 0 < r["unigram_loss"] < np.log(390) for r in evals)
    for step in (4, 6):
        ids = music.encode_midi(root / "straight" / "samples" / f"step_{step}.mid")
        assert ids.size > 0 and ids.max() < music.NUM_EVENTS
        assert (root / "straight" / "samples" / f"step_{step}.png").stat().st_size > 0


def test_generate_music_from_a_run_and_from_a_book_checkpoint(runs, tmp_path):
    root, config, _, _ = runs
    pm = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(0)
    inst.notes = [pretty_midi.Note(velocity=80, pitch=60 + i, start=0.25 * i, end=0.25 * i + 0.2) for i in range(8)]
    pm.instruments.append(inst)
    prompt = tmp_path / "in.mid"
    pm.write(str(prompt))
    seq = continue_midi(workdir=root / "straight", prompt_midi=prompt, prompt_len=10, num_tokens=12,
                        out=tmp_path / "out.mid", png=tmp_path / "roll.png", seed=3)  # fmt: skip
    assert len(seq) == 22 and seq[:10].tolist() == music.encode_midi(prompt)[:10].tolist()
    assert (tmp_path / "out.mid").is_file() and (tmp_path / "roll.png").is_file()
    with pytest.raises(ValueError, match="num_tokens"):
        continue_midi(workdir=root / "straight", prompt_midi=prompt, prompt_len=10, num_tokens=60, out=tmp_path / "x.mid")
    # A .pth of the book's PyTorch weights (here a small model of its design).
    torch.manual_seed(0)
    net = book_model(num_layers=1, num_heads=2, embed_dim=16, max_len=48)
    torch.save(net.state_dict(), tmp_path / "book.pth")
    seq = continue_midi(checkpoint=tmp_path / "book.pth", num_heads=2, prompt_midi=prompt, prompt_len=10, num_tokens=20,
                        greedy=True, out=tmp_path / "book.mid")  # fmt: skip
    from jaxdiff.music.reference_torch import book_sample

    expected = book_sample(net, torch.tensor(seq[None, :10]).long(), 30, greedy=True).numpy()[0]
    np.testing.assert_array_equal(seq, expected)


def test_music_benchmark_runs_on_a_tiny_model():
    """scripts/benchmark.py --task=music on a tiny model: rates exist and are positive (speed is not asserted)."""
    import importlib.util
    import sys

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("music_benchmark", REPO / "scripts" / "music_benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        result = bench.music_benchmark("tiny", prompt_len=8, num_tokens=8, rounds=1, train_iters=1, torch_threads=1,
                                       log=lambda s: None)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert set(result["best_tokens_per_sec"]) == {"jax_generate", "torch_generate", "jax_train", "torch_train"}
    assert all(v > 0 for v in result["best_tokens_per_sec"].values())
    assert result["ratio_generate"] > 0 and result["ratio_train"] > 0 and "ratio" in bench.format_table(result)
