"""Continue a MIDI prompt with a trained music Transformer and write MIDI (and a piano roll).

    python scripts/generate_music.py --workdir=runs/music --prompt_midi=in.mid --prompt_len=250 \
        --num_tokens=1000 --temperature=1.0 --out=out.mid --png=roll.png
    python scripts/generate_music.py --checkpoint=musicTrans.pth --prompt_midi=prompt.midi --out=out.mid

``--checkpoint``: a ``.pth`` of the book's PyTorch weights (loaded through
``jaxdiff.music.music_params_from_torch``). Without ``--prompt_midi`` the prompt is the held-out
piece of the run's data. ``--num_tokens`` counts new events; the prompt plus them must fit the
model's positions (2048 for the book's model).
"""

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A music training run (scripts/train.py --config=configs/music.py).")
flags.DEFINE_string("checkpoint", None, "A .pth state_dict of the book's model (instead of the run's weights).")
flags.DEFINE_string("prompt_midi", None, "MIDI file whose first --prompt_len events are the prompt.")
flags.DEFINE_integer("prompt_len", 250, "Events of the prompt.")
flags.DEFINE_integer("num_tokens", 1000, "New events to generate.")
flags.DEFINE_float("temperature", 1.0, "Divides the logits (< 1: safer, > 1: bolder).")
flags.DEFINE_bool("greedy", False, "Take the most likely event at every step.")
flags.DEFINE_integer("seed", 0, "Random seed of the draws.")
flags.DEFINE_integer("num_heads", 8, "Attention heads of a --checkpoint model (not stored in a state_dict).")
flags.DEFINE_string("out", None, "Output MIDI file.")
flags.DEFINE_string("png", None, "Also write a piano roll (prompt and continuation in two colours).")
flags.mark_flags_as_required(["out"])


def main(argv):
    del argv
    from jaxdiff.music.continuation import continue_midi

    seq = continue_midi(out=FLAGS.out, workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint,
                        prompt_midi=FLAGS.prompt_midi, prompt_len=FLAGS.prompt_len, num_tokens=FLAGS.num_tokens,
                        temperature=FLAGS.temperature, greedy=FLAGS.greedy, seed=FLAGS.seed, png=FLAGS.png,
                        num_heads=FLAGS.num_heads)  # fmt: skip
    print(f"wrote {FLAGS.out} ({len(seq)} events)" + (f" and {FLAGS.png}" if FLAGS.png else ""))


if __name__ == "__main__":
    app.run(main)
