"""Train a diffusion model: parses flags and calls ``jaxdiff.train.train_and_evaluate``.

    python scripts/train.py --config=configs/digits.py --workdir=runs/digits
    python scripts/train.py --config=configs/digits.py:conditional --workdir=runs/digits_cond
    python scripts/train.py --config=configs/flowers.py --workdir=runs/flowers \
        --config.data.data_dir=DATA_DIR --config.train.batch_size=8

Any config field can be overridden: ``--config.train.num_steps=100``. Re-running the same
command resumes from the newest checkpoint in ``--workdir``.
"""

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and sample grids go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax and grain are chatty at INFO
    from jaxdiff.train import train_and_evaluate

    train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
