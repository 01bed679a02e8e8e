"""The music Transformer: PyTorch parity, the book's state_dict, KV-cached generation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxdiff import music
from jaxdiff.music import model as model_lib
from jaxdiff.music.reference_torch import book_model, book_sample

SMALL = dict(num_layers=2, num_heads=2, embed_dim=32, max_len=96)


@pytest.fixture(scope="module")
def small():
    """A small model of the book's design with weights drawn by the PyTorch reference."""
    torch.manual_seed(0)
    net = book_model(**SMALL).eval()
    params = music.music_params_from_torch(net.state_dict())
    return net, music.MusicTransformer(**SMALL), params


def test_logits_match_pytorch(small):
    net, model, params = small
    tokens = np.random.default_rng(0).integers(0, music.VOCAB_SIZE, (3, 80))
    with torch.no_grad():
        expected = net(torch.from_numpy(tokens)).numpy()
    logits = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens, jnp.int32))
    assert logits.shape == (3, 80, music.VOCAB_SIZE) and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), expected, atol=2e-5, rtol=0)
    # And back: our export loads strictly into the reference and computes the same logits.
    other = book_model(**SMALL).eval()
    other.load_state_dict(music.music_params_to_torch(params), strict=True)
    with torch.no_grad():
        np.testing.assert_array_equal(other(torch.from_numpy(tokens)).numpy(), expected)


def test_training_mode_applies_dropout_and_inference_does_not(small):
    _, model, params = small
    tokens = jnp.arange(40, dtype=jnp.int32)[None] % 300
    apply = jax.jit(model.apply, static_argnames="train")
    a = apply({"params": params}, tokens, train=True, rngs={"dropout": jax.random.key(0)})
    b = apply({"params": params}, tokens, train=True, rngs={"dropout": jax.random.key(1)})
    c = apply({"params": params}, tokens)
    assert not np.allclose(a, b) and not np.allclose(a, c)
    np.testing.assert_array_equal(c, apply({"params": params}, tokens))


# The book's state_dict, entry by entry (MUSIC_SPEC.md: 83 entries, PyTorch Linear weights [out, in]).
def book_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"transformer.wte.weight": (390, 512), "transformer.wpe.weight": (2048, 512)}
    for i in range(6):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (512,), p + "ln_1.bias": (512,), p + "attn.bias": (1, 1, 2048, 2048),
            p + "attn.c_attn.weight": (1536, 512), p + "attn.c_attn.bias": (1536,),
            p + "attn.c_proj.weight": (512, 512), p + "attn.c_proj.bias": (512,),
            p + "ln_2.weight": (512,), p + "ln_2.bias": (512,),
            p + "mlp.c_fc.weight": (2048, 512), p + "mlp.c_fc.bias": (2048,),
            p + "mlp.c_proj.weight": (512, 2048), p + "mlp.c_proj.bias": (512,),
        })  # fmt: skip
    shapes.update({"transformer.ln_f.weight": (512,), "transformer.ln_f.bias": (512,), "lm_head.weight": (390, 512)})
    return shapes


def test_book_state_dict_round_trip():
    shapes = book_shapes()
    assert len(shapes) == 83
    gen = torch.Generator().manual_seed(0)
    state_dict = {
        name: torch.tril(torch.ones(2048, 2048)).view(1, 1, 2048, 2048) if name.endswith(".attn.bias")
        else torch.randn(shape, generator=gen)
        for name, shape in shapes.items()
    }  # fmt: skip
    params = music.music_params_from_torch(state_dict)
    model = music.MusicTransformer()
    expected = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 1), jnp.int32)), jax.random.key(0))["params"]
    assert jax.tree.map(np.shape, params) == jax.tree.map(lambda a: a.shape, expected)
    assert music.count_params(params) == 20_363_264
    np.testing.assert_array_equal(params["h_3"]["attn"]["c_attn"]["kernel"], state_dict["transformer.h.3.attn.c_attn.weight"].numpy().T)
    back = music.music_params_to_torch(params)
    assert list(back) == list(shapes)  # the book's 83 entries, in its order
    for name, tensor in state_dict.items():
        assert torch.equal(back[name], tensor), name
    # A full-size reference model has exactly these entries and loads them.
    assert {k: tuple(v.shape) for k, v in book_model().state_dict().items()} == shapes


def test_state_dict_errors_name_the_entries():
    state_dict = music.music_params_to_torch(music.init_params(music.MusicTransformer(**SMALL), jax.random.key(0)))
    with pytest.raises(ValueError, match="lm_head.weight"):
        music.music_params_from_torch({k: v for k, v in state_dict.items() if k != "lm_head.weight"})
    with pytest.raises(ValueError, match="extra.weight"):
        music.music_params_from_torch({**state_dict, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="c_fc.bias"):
        music.music_params_from_torch({**state_dict, "transformer.h.1.mlp.c_fc.bias": torch.zeros(7)})
    with pytest.raises(ValueError, match="causal"):
        music.music_params_from_torch({**state_dict, "transformer.h.0.attn.bias": torch.ones(1, 1, 96, 96)})


def test_greedy_generation_equals_the_recompute_loops(small):
    net, model, params = small
    prompt = np.random.default_rng(1).integers(0, music.NUM_EVENTS, (2, 12))
    cached = np.asarray(music.generate(model, params, prompt, jax.random.key(0), num_tokens=60, greedy=True))
    recomputed = np.asarray(music.generate_recompute(model, params, prompt, jax.random.key(5), num_tokens=60, greedy=True))
    book = book_sample(net, torch.from_numpy(prompt), 72, greedy=True).numpy()
    assert cached.shape == (2, 72) and cached.dtype == np.int32
    np.testing.assert_array_equal(cached[:, :12], prompt)
    np.testing.assert_array_equal(cached, recomputed)
    np.testing.assert_array_equal(cached, book)
    assert len(np.unique(cached[:, 12:])) > 3  # not a degenerate constant continuation


def test_sampling_same_key_same_tokens_and_one_compile(small):
    _, model, params = small
    prompt = np.random.default_rng(2).integers(0, music.NUM_EVENTS, (3, 10))
    before = model_lib._generate._cache_size()
    a = music.generate(model, params, prompt, jax.random.key(7), num_tokens=50, temperature=1.0)
    b = music.generate(model, params, prompt, jax.random.key(7), num_tokens=50, temperature=1.0)
    c = music.generate(model, params, prompt, jax.random.key(8), num_tokens=50, temperature=1.7)
    assert model_lib._generate._cache_size() == before + 1  # temperature and key are traced
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # The recompute loop draws the same tokens from the same key: the cache changes nothing.
    np.testing.assert_array_equal(a, music.generate_recompute(model, params, prompt, jax.random.key(7), num_tokens=50))
    assert np.asarray(a).max() < music.NUM_EVENTS
    np.testing.assert_array_equal(music.generate(model, params, prompt, jax.random.key(7), num_tokens=0), prompt)


def test_temperature_sharpens_and_end_and_pad_are_never_drawn(small):
    _, model, params = small
    # Make 388 and 389 by far the most likely ids: they must still never be drawn.
    rigged = jax.tree.map(lambda x: x, params)
    rigged["lm_head"]["kernel"] = jnp.asarray(params["lm_head"]["kernel"]).at[:, music.END_ID:].set(5.0)
    prompt = np.full((4, 5), 60, np.int32)
    seq = np.asarray(music.generate(model, rigged, prompt, jax.random.key(0), num_tokens=40, temperature=3.0))
    assert seq[:, 5:].max() < music.NUM_EVENTS
    cold = np.asarray(music.generate(model, params, prompt, jax.random.key(0), num_tokens=40, temperature=1e-4))
    greedy = np.asarray(music.generate(model, params, prompt, jax.random.key(0), num_tokens=40, greedy=True))
    np.testing.assert_array_equal(cold, greedy)  # a temperature near 0 is the argmax
    hot = np.asarray(music.generate(model, params, prompt, jax.random.key(0), num_tokens=40, temperature=50.0))
    assert len(np.unique(hot[:, 5:])) > len(np.unique(greedy[:, 5:]))


def test_generate_rejects_what_it_cannot_do(small):
    _, model, params = small
    with pytest.raises(ValueError, match="max_len=96"):
        music.generate(model, params, np.zeros((1, 50), np.int32), jax.random.key(0), num_tokens=47)
    with pytest.raises(ValueError, match="temperature"):
        music.generate(model, params, np.zeros((1, 5), np.int32), jax.random.key(0), num_tokens=4, temperature=0.0)
    with pytest.raises(ValueError, match="prompt"):
        music.generate(model, params, np.zeros((5,), np.int32), jax.random.key(0), num_tokens=4)


def test_book_defaults_and_bfloat16():
    model = music.MusicTransformer()
    assert (model.num_layers, model.num_heads, model.embed_dim, model.vocab_size, model.max_len, model.dropout_rate) == (
        6, 8, 512, 390, 2048, 0.1)  # fmt: skip
    half = music.MusicTransformer(num_layers=1, num_heads=2, embed_dim=16, max_len=8, dtype=jnp.bfloat16)
    params = music.init_params(half, jax.random.key(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    logits = half.apply({"params": params}, jnp.zeros((1, 7), jnp.int32))
    assert logits.dtype == jnp.float32 and logits.shape == (1, 7, 390)
