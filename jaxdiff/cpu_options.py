"""XLA:CPU compile options: which library fusions the CPU backend uses (speed only).

Every jitted program of jaxdiff (train step, sampler, benchmark) compiles with
:func:`cpu_compiler_options`, per function: no process-wide flags are touched.
"""

from __future__ import annotations

import functools
import os

import jax

# XLA:CPU can hand dots and convolutions to the YNNPACK library ("YNN fusions"). Which setting is
# fastest depends on the CPU; measured with the small book U-Net (fp32, batch 32, 16x16), jaxlib
# 0.10.2, on two 2-core AMD EPYC virtual machines:
#   the project's first CPU study (CPU features not recorded): jaxlib's default YNN fusions
#     1.6-1.8x slower than none ("off");
#   Zen 5 with AVX-512: forward pass 48 ms "off", 35 ms jaxlib default, 25 ms "dot"; forward +
#     backward within 5% of each other.
# "auto" follows these two data points: "dot" with AVX-512, "off" without. A guess between them
# for other CPUs; JAXDIFF_CPU_FUSION (or the benchmark's --cpu_fusion sweep) settles it.
CPU_FUSION_MODES = {
    "off": "",  # XLA's own kernels (Eigen convolutions and dots)
    "dot": "LIBRARY_FUSION_TYPE_DOT",  # YNNPACK dots/convolutions with their fused operands
    # ... and every convolution handed to YNNPACK on its own (the digits U-Net's train step:
    # 1.11x faster than "dot" on the Zen 5 machine, interleaved windows).
    "dot_conv": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
    "jax_default": None,  # whatever this jaxlib does by default
}
CPU_FUSION_ENV = "JAXDIFF_CPU_FUSION"


@functools.cache
def _cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        pass
    return False


def cpu_fusion_mode(mode: str | None = None) -> str:
    """The XLA:CPU library-fusion mode to compile with: one of :data:`CPU_FUSION_MODES`.

    ``mode`` (or, when ``None``, the environment variable ``JAXDIFF_CPU_FUSION``, default
    ``"auto"``) names it; ``"auto"`` picks ``"dot"`` on CPUs with AVX-512 and ``"off"`` on
    others, after the two machines measured (see the comment above :data:`CPU_FUSION_MODES`).
    The choice changes speed only: the modes compute the same function (tested).

    Example:
      >>> cpu_fusion_mode("off")
      'off'
    """
    mode = os.environ.get(CPU_FUSION_ENV, "auto") if mode is None else mode
    if mode == "auto":
        return "dot" if _cpu_has_avx512() else "off"
    if mode not in CPU_FUSION_MODES:
        raise ValueError(
            f"CPU fusion mode {mode!r} is not one of {('auto', *CPU_FUSION_MODES)}; set "
            f"{CPU_FUSION_ENV} (or pass mode) to one of them."
        )
    return mode


def cpu_compiler_options(mode: str | None = None) -> dict[str, str] | None:
    """Per-function XLA options for the CPU backend (see :func:`cpu_fusion_mode`); ``None`` on
    other backends or where jaxlib's defaults are wanted. No process-wide flags are touched.
    """
    if jax.default_backend() != "cpu":
        return None
    value = CPU_FUSION_MODES[cpu_fusion_mode(mode)]
    return None if value is None else {"xla_cpu_experimental_ynn_fusion_type": value}
