"""Music Transformer speed against the book's PyTorch code, in one run (``benchmark.py --task=music``).

    python scripts/benchmark.py --task=music                         # the embedded default's model
    python scripts/benchmark.py --task=music --music_size=book       # the book's 20.4M model (GPU)

Two comparisons on the same device, the two sides' timing windows interleaved (the machine may
be shared: every window records the load average):

* generation: tokens/s of ``jaxdiff.music.generate`` (KV cache, one ``lax.scan`` in one ``jit``)
  for ``--music_tokens`` new tokens after a ``--music_prompt_len`` prompt, against the book's
  loop in PyTorch (:func:`jaxdiff.music.reference_torch.book_sample`: the whole prefix again for
  every token, eval mode, no ``no_grad``), batch 1, temperature 1;
* training: tokens/s of the music task's train step (jitted, AdamW, clipping, dropout) against a
  PyTorch step of the same model (forward, ``CrossEntropyLoss(ignore_index=389)``, backward,
  ``clip_grad_norm_``, AdamW) at the config's batch and window length.

Compilation is excluded from the rates (reported apart); ratios are JAX / PyTorch.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIZES = {  # (num_layers, num_heads, embed_dim, train batch, train window)
    "tiny": (1, 2, 16, 4, 32),
    "default": None,  # configs/music.py
    "book": (6, 8, 512, 2, 2048),
}


def music_config(size: str):
    """The training config a size names (the model, batch and window the benchmark uses)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("configs_music", os.path.join(REPO, "configs", "music.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("book" if size == "book" else None)
    if SIZES[size] is not None:
        layers, heads, width, batch, window = SIZES[size]
        config.model.num_layers, config.model.num_heads, config.model.embed_dim = layers, heads, width
        config.train.batch_size, config.data.seq_len = batch, window
        config.model.max_len = max(config.model.max_len, window)
    return config


def _load() -> list[float]:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else []


def _timed(fn, sync) -> tuple[float, Any]:
    start = time.perf_counter()
    out = sync(fn())
    return time.perf_counter() - start, out


def music_benchmark(size: str = "default", *, prompt_len: int = 250, num_tokens: int = 1000, rounds: int = 2,
                    train_iters: int = 3, torch_threads: int = 0, log=print) -> dict[str, Any]:  # fmt: skip
    """Runs both comparisons; returns rates, per-round ratios, compile times and load averages."""
    import torch

    from jaxdiff import music
    from jaxdiff import train as train_lib
    from jaxdiff.music import training as music_training
    from jaxdiff.music.reference_torch import book_loss, book_model, book_sample

    if torch_threads:
        torch.set_num_threads(torch_threads)
    device = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
    tsync = (lambda x: (torch.cuda.synchronize(), x)[1]) if device == "cuda" else (lambda x: x)
    config = music_config(size)
    m = config.model
    total = prompt_len + num_tokens
    dims = dict(num_layers=m.num_layers, num_heads=m.num_heads, embed_dim=m.embed_dim)
    gen_model = music.MusicTransformer(**dims, max_len=max(total, m.max_len))
    torch.manual_seed(0)
    gen_net = book_model(**dims, max_len=max(total, m.max_len)).to(device).eval()
    gen_params = jax.device_put(music.music_params_from_torch(gen_net.state_dict()))
    prompt = np.random.default_rng(0).integers(0, music.NUM_EVENTS, (1, prompt_len)).astype(np.int32)
    prompt_t = torch.from_numpy(prompt).long().to(device)

    def jax_generate(i):
        return music.generate(gen_model, gen_params, prompt, jax.random.key(i), num_tokens=num_tokens)

    compile_gen, _ = _timed(lambda: jax_generate(0), jax.block_until_ready)

    # Training: the task's real step (config's optimizer, clipping, dropout) against PyTorch's.
    mesh = train_lib.make_mesh(jax.local_devices()[:1])
    task = music_training.music_task(config, mesh)
    state = jax.jit(task.init_state)(jax.random.key(0), None)
    step_fn = train_lib.jit_train_step(task.train_step, mesh)
    b, s = int(config.train.batch_size), int(config.data.seq_len)
    rng = np.random.default_rng(1)
    batch_np = {"inputs": rng.integers(0, 388, (b, s)).astype(np.int32), "targets": rng.integers(0, 389, (b, s)).astype(np.int32)}
    batch = train_lib.shard_batch(batch_np, mesh)
    holder = {"state": state}

    def jax_train():
        for _ in range(train_iters):
            holder["state"], metrics = step_fn(holder["state"], batch, jax.random.key(1))
        return metrics["loss"]

    def first_step():  # compiles; the state is donated, so keep the new one
        holder["state"], metrics = step_fn(holder["state"], batch, jax.random.key(1))
        return metrics["loss"]

    compile_train, _ = _timed(first_step, jax.block_until_ready)
    o = config.optim
    net = book_model(**dims, max_len=max(s, m.max_len)).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
    x_t, y_t = (torch.from_numpy(batch_np[k]).long().to(device) for k in ("inputs", "targets"))

    def torch_train():
        for _ in range(train_iters):
            loss = book_loss(net(x_t), y_t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), o.grad_clip_norm)
            opt.step()
        return loss.item()

    jax.block_until_ready(jax_train())  # warm-up (the donated state's second call may compile again)
    torch_train()
    windows: dict[str, list[dict[str, Any]]] = {k: [] for k in ("jax_generate", "torch_generate", "jax_train", "torch_train")}
    for r in range(rounds):
        for name, fn, sync, tokens in (
            ("jax_generate", lambda: jax_generate(r + 1), jax.block_until_ready, num_tokens),
            ("torch_generate", lambda: book_sample(gen_net, prompt_t, total), tsync, num_tokens),
            ("jax_train", jax_train, jax.block_until_ready, train_iters * b * s),
            ("torch_train", torch_train, tsync, train_iters * b * s),
        ):
            load = _load()
            seconds, _ = _timed(fn, sync)
            windows[name].append({"seconds": seconds, "tokens_per_sec": tokens / seconds, "load_before": load,
                                  "load_after": _load()})  # fmt: skip
            log(f"round {r + 1}/{rounds} {name}: {tokens / seconds:,.0f} tokens/s ({seconds:.2f} s, load {load[:1]})")
    best = {k: max(w["tokens_per_sec"] for w in v) for k, v in windows.items()}
    per_round = {
        task_: [windows[f"jax_{task_}"][i]["tokens_per_sec"] / windows[f"torch_{task_}"][i]["tokens_per_sec"]
                for i in range(rounds)]
        for task_ in ("generate", "train")
    }  # fmt: skip
    return {
        "size": size,
        "model": {**dims, "parameters": music.count_params(gen_params) - (gen_model.max_len - m.max_len) * m.embed_dim},
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "generate": {"prompt_len": prompt_len, "num_tokens": num_tokens, "batch": 1, "jax_compile_seconds": compile_gen},
        "train": {"batch": b, "seq_len": s, "iters_per_window": train_iters, "jax_compile_seconds": compile_train},
        "best_tokens_per_sec": best,
        "ratios_per_round": per_round,
        "ratio_generate": statistics.median(per_round["generate"]),
        "ratio_train": statistics.median(per_round["train"]),
        "windows": windows,
    }


def format_table(result: dict[str, Any]) -> str:
    best = result["best_tokens_per_sec"]
    g, t = result["generate"], result["train"]
    loads = [w["load_before"][0] for v in result["windows"].values() for w in v if w["load_before"]]
    lines = [
        f"music Transformer, size {result['size']} ({result['model']}), device {result['device']}, "
        f"torch threads {result['torch_threads']}, load average {min(loads, default=0):.1f}-{max(loads, default=0):.1f}",
        f"{'':34s}{'jaxdiff':>12s}{'PyTorch':>12s}{'ratio':>9s}",
        f"{'generate tokens/s (' + str(g['num_tokens']) + ' after ' + str(g['prompt_len']) + ')':34s}"
        f"{best['jax_generate']:12,.1f}{best['torch_generate']:12,.1f}{result['ratio_generate']:9.2f}",
        f"{'train tokens/s (batch ' + str(t['batch']) + ' x ' + str(t['seq_len']) + ')':34s}"
        f"{best['jax_train']:12,.1f}{best['torch_train']:12,.1f}{result['ratio_train']:9.2f}",
        f"per-round ratios: generate {[round(r, 2) for r in result['ratios_per_round']['generate']]}, "
        f"train {[round(r, 2) for r in result['ratios_per_round']['train']]}; jax compile: generate "
        f"{g['jax_compile_seconds']:.1f} s, train step {t['jax_compile_seconds']:.1f} s",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run: python scripts/benchmark.py --task=music")
