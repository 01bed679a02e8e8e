"""Tests of jaxdiff.solvers (DPM-Solver, UniPC, Euler, Heun, PLMS).

* Parity of whole sampling loops (every state of the trajectory) with diffusers 0.42.1's
  schedulers on a smooth toy model, for every option of the contract, on the linear,
  scaled-linear and cosine schedules. The reference runs diffusers' own ``set_timesteps`` and
  ``step`` code in float64 (its float32 casts disabled), so the comparison measures our float32
  rounding, not theirs. The grid drives each sampler's own plan builder and loop with one
  compiled loop per structure (the CI budget); further tests run the public functions against
  diffusers as it runs (float32), against its own schedules, and in float64 (jax_enable_x64).
* The analytic Gaussian test: data ``N(mu, s^2)`` and the exact denoiser, so the exact answer is
  known; every sampler's error in std and mean is small and falls with the number of steps.
* Stochastic samplers: same key same images, and diffusers' distribution.
* Timestep rules against diffusers' tables (hypothesis); one scan, ``eps_fn`` traced once for any
  number of steps; clear errors; the diffusers-config mapping.
"""

from __future__ import annotations

import functools
import inspect
import json
import math

import diffusers
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_ancestral_module
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.utils import logging as diffusers_logging
from hypothesis import assume, given

from jaxdiff import samplers, schedules, solvers
from jaxdiff.solvers import _loop, _tables, dpm, karras, pndm, unipc

diffusers_logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning", "ignore::UserWarning",
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",  # diffusers + numpy 2
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Small torch ops are much slower with a contended thread pool (CI shares its cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

T = 1000
SCHEDULES = {
    "linear": schedules.linear(T),
    "scaled_linear": schedules.scaled_linear(T),
    "cosine": schedules.cosine(T),
}
DIFFUSERS_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
SHAPE = (4, 8, 8, 1)
X_T = np.asarray(jax.random.normal(jax.random.key(1), SHAPE, jnp.float32))
KEY = jax.random.key(0)

# A smooth toy model, the same function of (x, t) in JAX and in torch.
TOY_A, TOY_B = 0.7, 1.3


def toy_eps(x, t):
    t = t.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.tanh(TOY_A * x + TOY_B * t / T)


def toy_eps_torch(x, t):
    return torch.tanh(TOY_A * x + TOY_B * torch.as_tensor(t, dtype=x.dtype) / T)


SAMPLE_FUNCTIONS = {
    "dpm_solver": solvers.dpm_solver_sample,
    "unipc": solvers.unipc_sample,
    "euler": solvers.euler_sample,
    "heun": solvers.heun_sample,
    "pndm": solvers.pndm_sample,
}
PLAN_BUILDERS = {
    "dpm_solver": dpm._dpm_solver_plan,
    "unipc": unipc._unipc_plan,
    "euler": karras._euler_plan,
    "heun": karras._heun_plan,
    "pndm": pndm._pndm_plan,
}


# ----------------------------------------------------------------------------- diffusers reference


class _Float64(torch.Tensor):
    """A float64 tensor that ignores ``.to(torch.float32)``, so diffusers' steps run in float64."""

    def to(self, *args, **kwargs):
        if torch.float32 in args or kwargs.get("dtype") is torch.float32:
            return self
        return super().to(*args, **kwargs)


def diffusers_config(family: str, kwargs: dict) -> tuple[type, dict]:
    """Our keyword arguments -> (diffusers scheduler class, its config)."""
    names = {"order": "solver_order", "spacing": "timestep_spacing"}
    config = {names.get(k, k): v for k, v in kwargs.items()
              if k not in ("ancestral", "final_alpha_cumprod")}  # fmt: skip
    if family == "euler" and kwargs.get("ancestral"):
        return diffusers.EulerAncestralDiscreteScheduler, config
    if family == "pndm":
        config.update(skip_prk_steps=True, set_alpha_to_one=kwargs.get("final_alpha_cumprod") == 1.0)
    classes = {
        "dpm_solver": diffusers.DPMSolverMultistepScheduler,
        "unipc": diffusers.UniPCMultistepScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "heun": diffusers.HeunDiscreteScheduler,
        "pndm": diffusers.PNDMScheduler,
    }
    return classes[family], config


@functools.partial(jax.jit, static_argnums=(1, 2))
def _noise_draws(key, num_steps, shape):
    steps = jnp.arange(num_steps)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))(steps)


def noise_draws(num_steps: int, shape=SHAPE, key=KEY) -> list[np.ndarray]:
    """The draws of a stochastic sampler: step i uses fold_in(key, i) for the whole batch."""
    return list(np.asarray(_noise_draws(key, num_steps, tuple(shape))))


def run_diffusers(family, schedule_name, num_steps, kwargs, *, float64=True, monkeypatch=None,
                  x_T=X_T, model=toy_eps_torch, native_schedule=False, our_sigmas=False):  # fmt: skip
    """diffusers' sampling loop; returns ``(x_0, VP states [n + 1], scheduler)``.

    The scheduler gets our schedule's ``alphas_cumprod`` (unless ``native_schedule``), and
    ``set_begin_index(0)``: with repeated timesteps (Karras sigmas on the cosine schedule)
    diffusers' own step-index lookup starts at the wrong step and fails. Stochastic steps get
    our noise draws. Where diffusers returns NaN, the returned x_0 is the sigma -> 0 limit that
    jaxdiff documents, computed from diffusers' own state (and that is asserted to be the case).
    ``our_sigmas`` replaces diffusers' noise levels by ours, which differ by one float32 ulp at
    some levels (torch's ``x ** 0.5`` is not always the correctly rounded ``sqrt``).
    """
    cls, config = diffusers_config(family, kwargs)
    if native_schedule:
        config["beta_schedule"] = DIFFUSERS_BETA_SCHEDULES[schedule_name]
        if schedule_name == "scaled_linear":
            config.update(beta_start=0.00085, beta_end=0.012)  # schedules.scaled_linear's defaults
    scheduler = cls(num_train_timesteps=T, **config)
    if not native_schedule:
        scheduler.alphas_cumprod = torch.from_numpy(np.asarray(SCHEDULES[schedule_name].alphas_cumprod))
        if family == "pndm" and not config["set_alpha_to_one"]:
            scheduler.final_alpha_cumprod = scheduler.alphas_cumprod[0]
    scheduler.set_timesteps(num_steps)
    if family != "pndm":
        scheduler.set_begin_index(0)
    if our_sigmas:
        table_keys = ("use_karras_sigmas", "spacing", "steps_offset", "final_sigmas_type")
        _, sigmas = solvers.solver_timesteps(family, SCHEDULES[schedule_name], num_steps,
                                             **{k: v for k, v in kwargs.items() if k in table_keys})  # fmt: skip
        if family == "heun":  # diffusers repeats every level but the first and the last
            sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        np.testing.assert_allclose(sigmas, scheduler.sigmas.numpy(), rtol=3e-7)
        scheduler.sigmas = torch.from_numpy(sigmas)
    dtype = torch.float64 if float64 else torch.float32
    if float64:
        if family == "pndm":
            scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
            scheduler.final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod).double()
        else:
            scheduler.sigmas = scheduler.sigmas.double()
    x = torch.from_numpy(x_T).to(dtype) * scheduler.init_noise_sigma
    if float64:
        x = x.as_subclass(_Float64)
    stochastic = kwargs.get("algorithm_type") == "sde-dpmsolver++" or kwargs.get("ancestral")
    noises = iter(noise_draws(len(scheduler.timesteps), x_T.shape)) if stochastic else None
    if kwargs.get("ancestral"):
        monkeypatch.setattr(euler_ancestral_module, "randn_tensor",
                            lambda *a, **k: torch.from_numpy(next(noises)).to(dtype))  # fmt: skip
    states = [x]
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t)
        extra = {}
        if family == "dpm_solver" and stochastic:
            extra["variance_noise"] = torch.from_numpy(next(noises)).to(dtype)
        x = scheduler.step(out, t, x, **extra).prev_sample
        states.append(x)
    states = [np.asarray(s.as_subclass(torch.Tensor).double().numpy()) for s in states]
    if not np.all(np.isfinite(states[-1])):
        states[-1] = _documented_limit(family, kwargs, scheduler, states)
    return states[-1], _to_vp_states(family, scheduler, states, num_steps), scheduler


def _documented_limit(family, kwargs, scheduler, states):
    """Where diffusers returns NaN: jaxdiff's documented sigma -> 0 limit of the last step."""
    sigmas = scheduler.sigmas.double().numpy()
    if family == "dpm_solver":  # Karras + sigma_min: a zero-length last step -> the identity
        assert sigmas[-1] == sigmas[-2], "diffusers NaN outside the documented case"
        return states[-2]
    assert family == "unipc" and sigmas[-1] == 0.0, "diffusers NaN outside the documented case"
    assert kwargs.get("solver_type") == "bh1" or kwargs.get("predict_x0") is False
    m = scheduler.model_outputs[-1].as_subclass(torch.Tensor).double().numpy()
    if kwargs.get("predict_x0", True):
        return m  # the data prediction at the last step
    corrected = scheduler.last_sample.as_subclass(torch.Tensor).double().numpy()
    sigma = sigmas[-2]
    return corrected * math.sqrt(sigma**2 + 1) - sigma * m  # x0 from the noise prediction


def _to_vp_states(family, scheduler, states, num_steps):
    """diffusers' states after each full step, as VP states (Euler/Heun work in sigma units)."""
    if family == "pndm":  # call 0 is the improved Euler step's first half
        return [states[0]] + (states[2:] if num_steps > 1 else states[1:])
    if family in ("dpm_solver", "unipc"):
        return states
    sigmas = scheduler.sigmas.double().numpy()
    if family == "heun":  # full steps end after the odd calls and the last one
        rows = [0] + list(range(2, 2 * num_steps - 1, 2)) + [2 * num_steps - 1]
    else:
        rows = list(range(num_steps + 1))
    return [states[r] / np.sqrt(sigmas[r] ** 2 + 1) for r in rows]


def run_ours(family, schedule_name, num_steps, kwargs, x_T=X_T):
    """The public sampler, jitted: ``(x_0, trajectory)``."""
    fn, schedule = SAMPLE_FUNCTIONS[family], SCHEDULES[schedule_name]
    run = jax.jit(lambda x, key: fn(toy_eps, schedule, x, key, num_steps=num_steps, return_trajectory=True,
                                    **kwargs))  # fmt: skip
    x0, trajectory = run(jnp.asarray(x_T), KEY)
    return _checked(np.asarray(x0), np.asarray(trajectory), num_steps, x_T)


# The grid's fast path: the sampler's own tables (its plan builder) run by its own loop, jitted
# once per loop structure (family, order, stochastic) and length; the coefficients are arguments.
_scan_plan = jax.jit(_loop.scan_plan, static_argnums=(0,),
                     static_argnames=("structure", "return_trajectory"))  # fmt: skip


def run_ours_fast(family, schedule_name, num_steps, kwargs, x_T=X_T):
    """What ``run_ours`` computes (see test_fast_path_is_the_public_sampler), compiled far less."""
    params = inspect.signature(SAMPLE_FUNCTIONS[family]).parameters
    arguments = {n: p.default for n, p in params.items()
                 if p.kind is p.KEYWORD_ONLY and n != "return_trajectory"}  # fmt: skip
    arguments.update(kwargs, num_steps=num_steps)
    plan = PLAN_BUILDERS[family](SCHEDULES[schedule_name], **arguments)
    x0, trajectory = _scan_plan(toy_eps, jnp.asarray(x_T), KEY, _loop.loop_rows(plan),
                                structure=_loop.loop_structure(plan), return_trajectory=True)  # fmt: skip
    return _checked(np.asarray(x0), np.asarray(trajectory), num_steps, x_T)


def _checked(x0, trajectory, num_steps, x_T):
    assert trajectory.shape == (num_steps + 1,) + x_T.shape
    np.testing.assert_array_equal(trajectory[-1], x0)
    assert np.all(np.isfinite(trajectory))
    return x0, trajectory


def relative_error(ours: np.ndarray, reference) -> float:
    """max |ours - ref| / max |ref| over every state of the trajectory (the worst state)."""
    assert len(ours) == len(reference)
    return max(float(np.max(np.abs(o - r)) / np.max(np.abs(r))) for o, r in zip(ours, reference))


# --------------------------------------------------------------------------------- parity grid

# Every option of the contract, each run on the three schedules (num_steps rotates so that both
# diffusers' "n < 15" lower-order rule and long runs are covered).
VARIANTS = {
    "dpm_solver": [
        {},
        {"order": 1},
        {"order": 3},
        {"solver_type": "heun"},
        {"order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"},
        {"lower_order_final": False, "solver_type": "heun", "final_sigmas_type": "sigma_min"},
        {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
        {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_type": "heun"},
        {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "order": 3,
         "prediction_type": "v_prediction"},
        {"algorithm_type": "sde-dpmsolver++"},
        {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
        {"algorithm_type": "sde-dpmsolver++", "order": 3, "use_karras_sigmas": True},
        {"use_karras_sigmas": True},
        {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "order": 3},
        {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "solver_type": "heun"},
        {"spacing": "leading", "steps_offset": 1},
        {"spacing": "trailing", "prediction_type": "sample"},
        {"prediction_type": "v_prediction", "order": 3},
        {"final_sigmas_type": "sigma_min"},
    ],
    "unipc": [
        {},
        {"order": 1},
        {"order": 3},
        {"solver_type": "bh1"},
        {"solver_type": "bh1", "order": 3, "prediction_type": "v_prediction"},
        {"predict_x0": False},
        {"predict_x0": False, "order": 3, "prediction_type": "sample"},
        {"predict_x0": False, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
        {"lower_order_final": False, "final_sigmas_type": "sigma_min", "order": 3},
        {"use_karras_sigmas": True},
        {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "order": 3},
        {"spacing": "leading", "steps_offset": 1},
        {"spacing": "trailing", "prediction_type": "v_prediction"},
        {"prediction_type": "sample"},
        {"final_sigmas_type": "sigma_min"},
    ],
    "euler": [
        {},
        {"use_karras_sigmas": True},
        {"use_karras_sigmas": True, "spacing": "leading", "prediction_type": "v_prediction"},
        {"spacing": "leading", "steps_offset": 1},
        {"spacing": "trailing", "prediction_type": "sample"},
        {"prediction_type": "v_prediction"},
        {"ancestral": True},
        {"ancestral": True, "spacing": "leading", "steps_offset": 1, "prediction_type": "v_prediction"},
        {"ancestral": True, "spacing": "trailing"},
    ],
    "heun": [
        {},
        {"use_karras_sigmas": True},
        {"spacing": "leading", "steps_offset": 1, "prediction_type": "v_prediction"},
        {"spacing": "trailing", "use_karras_sigmas": True, "prediction_type": "sample"},
        {"prediction_type": "sample"},
    ],
    "pndm": [
        {},
        {"steps_offset": 1, "final_alpha_cumprod": 1.0},
        {"spacing": "trailing"},
        {"prediction_type": "v_prediction"},
    ],
}
# Both sides of diffusers' "n < 15" lower-order rule; 8 and 20 divide T (PLMS "trailing").
NUM_STEPS = (8, 20)
PARITY_RTOL = 1e-5
# Some combinations are ill-conditioned in float32 whoever computes them: converting an x0 or v
# output to a noise prediction divides by s (~0.01 near t = 0) or, on the cosine schedule, loses
# v's contribution next to sigma = 2e4; Heun's correction multiplies the difference of its two
# outputs by sigma_0 / sigma_1 (~1e4 on the cosine schedule). There the model's own float32
# rounding is amplified, and diffusers' float32 run is off by as much (or far more); jaxdiff must
# then be no worse than it. test_float64_equals_diffusers shows the maths itself is exact.
DIFFUSERS_FLOAT32_FACTOR = 3.0


def _parity_cases():
    for family, variants in VARIANTS.items():
        for k, variant in enumerate(variants):
            for j, schedule_name in enumerate(SCHEDULES):
                num_steps = NUM_STEPS[(k + j) % 2]
                options = ",".join(f"{a}={b}" for a, b in variant.items())
                ident = f"{family}-{k}-{schedule_name}-{num_steps}-{options}"
                yield pytest.param(family, variant, schedule_name, num_steps, id=ident)


@pytest.mark.parametrize("family,kwargs,schedule_name,num_steps", list(_parity_cases()))
def test_parity_with_diffusers(family, kwargs, schedule_name, num_steps, monkeypatch):
    x0, trajectory = run_ours_fast(family, schedule_name, num_steps, kwargs)
    ref_x0, ref_states, _ = run_diffusers(family, schedule_name, num_steps, kwargs, monkeypatch=monkeypatch)
    error = max(relative_error([x0], [ref_x0]), relative_error(trajectory, ref_states))
    if error >= PARITY_RTOL:
        _, f32_states, _ = run_diffusers(family, schedule_name, num_steps, kwargs, float64=False,
                                         monkeypatch=monkeypatch)  # fmt: skip
        diffusers_error = relative_error(f32_states, ref_states)
        assert error < DIFFUSERS_FLOAT32_FACTOR * diffusers_error, (error, diffusers_error)


@pytest.mark.parametrize("family,kwargs", [
    ("dpm_solver", {}), ("dpm_solver", {"algorithm_type": "sde-dpmsolver++", "order": 3}),
    ("unipc", {"order": 3}), ("euler", {"use_karras_sigmas": True}), ("euler", {"ancestral": True}),
    ("heun", {}), ("pndm", {"prediction_type": "v_prediction"}),
])  # fmt: skip
@pytest.mark.parametrize("schedule_name", ["linear", "scaled_linear"])
def test_parity_with_diffusers_in_float32(family, kwargs, schedule_name, monkeypatch):
    """Against diffusers as it runs (float32), on the schedules where float32 is well conditioned."""
    x0, _ = run_ours(family, schedule_name, 10, kwargs)
    ref_x0, _, _ = run_diffusers(family, schedule_name, 10, kwargs, float64=False, monkeypatch=monkeypatch)
    assert relative_error([x0], [ref_x0]) < 2e-5


@pytest.mark.parametrize("family,kwargs", [
    ("dpm_solver", {"algorithm_type": "sde-dpmsolver++", "order": 3}), ("unipc", {"order": 3}),
    ("heun", {"use_karras_sigmas": True}), ("pndm", {}),
])  # fmt: skip
def test_fast_path_is_the_public_sampler(family, kwargs):
    public = run_ours(family, "cosine", 8, kwargs)
    fast = run_ours_fast(family, "cosine", 8, kwargs)
    for a, b in zip(public, fast):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.max(np.abs(b)))


def test_float64_equals_diffusers():
    """In float64 (jax_enable_x64, deterministic samplers: the noise draws would differ) the loops
    equal diffusers' float64 run to float64 rounding (amplified where float32 was, see
    DIFFUSERS_FLOAT32_FACTOR): the parity errors above are float32 rounding only."""
    cases = [("heun", "cosine", 5, {"prediction_type": "sample"}, 1e-8),  # see DIFFUSERS_FLOAT32_FACTOR
             ("unipc", "cosine", 8, {"order": 3, "predict_x0": False, "prediction_type": "sample"}, 1e-9),
             ("dpm_solver", "cosine", 16, {"order": 3, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min",
                                           "solver_type": "heun"}, 1e-12),
             ("dpm_solver", "cosine", 12, {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min",
                                           "order": 3, "prediction_type": "v_prediction"}, 1e-12)]  # fmt: skip
    for family, schedule_name, num_steps, kwargs, rtol in cases:
        _, ref_states, _ = run_diffusers(family, schedule_name, num_steps, kwargs, our_sigmas=True)
        with jax.enable_x64(True):
            fn = SAMPLE_FUNCTIONS[family]
            _, trajectory = jax.jit(lambda x, k: fn(toy_eps, SCHEDULES[schedule_name], x, k, num_steps=num_steps,
                                                    return_trajectory=True, **kwargs))(  # noqa: B023
                jnp.asarray(X_T, jnp.float64), KEY)  # fmt: skip
            assert trajectory.dtype == jnp.float64
            assert relative_error(np.asarray(trajectory), ref_states) < rtol, (family, kwargs)


def test_parity_with_diffusers_own_schedules(monkeypatch):
    """diffusers building its betas itself (float32 cumprod) vs schedules.* (float64 cumprod)."""
    for family, kwargs in [("dpm_solver", {}), ("euler", {}), ("unipc", {"order": 3})]:
        for schedule_name in ("linear", "scaled_linear"):
            x0, _ = run_ours_fast(family, schedule_name, 10, kwargs)
            ref_x0, _, _ = run_diffusers(family, schedule_name, 10, kwargs, native_schedule=True,
                                         monkeypatch=monkeypatch)  # fmt: skip
            assert relative_error([x0], [ref_x0]) < 1e-4


def test_where_diffusers_returns_nan_the_limit_is_returned():
    """diffusers gives NaN here; jaxdiff's result is finite (its value is checked in the grid)."""
    cases = [("unipc", {"solver_type": "bh1"}), ("unipc", {"predict_x0": False}),
             ("dpm_solver", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "order": 3})]  # fmt: skip
    for family, kwargs in cases:
        cls, config = diffusers_config(family, kwargs)
        scheduler = cls(**config)
        scheduler.set_timesteps(16)
        x = torch.from_numpy(X_T)
        for t in scheduler.timesteps:
            x = scheduler.step(toy_eps_torch(x, t), t, x).prev_sample
        assert torch.isnan(x).any(), (family, kwargs)
        x0, _ = run_ours_fast(family, "linear", 16, kwargs)
        assert np.all(np.isfinite(x0))


# ------------------------------------------------------------------------ timestep rules


def _diffusers_table(family, schedule_name, num_steps, kwargs):
    cls, config = diffusers_config(family, kwargs)
    config["beta_schedule"] = "linear"  # the alphas_cumprod are replaced below
    scheduler = cls(num_train_timesteps=T, **config)
    scheduler.alphas_cumprod = torch.from_numpy(np.asarray(SCHEDULES[schedule_name].alphas_cumprod))
    scheduler.set_timesteps(num_steps)
    return scheduler


@given(
    family=st.sampled_from(["dpm_solver", "unipc", "euler", "heun"]),
    schedule_name=st.sampled_from(sorted(SCHEDULES)),
    num_steps=st.one_of(st.integers(1, 40), st.integers(41, 400)),
    spacing=st.sampled_from(samplers.SPACINGS),
    steps_offset=st.sampled_from([0, 1]),
    karras=st.booleans(),
    final=st.sampled_from(solvers.FINAL_SIGMAS_TYPES),
)
def test_timesteps_and_sigmas_equal_diffusers(family, schedule_name, num_steps, spacing, steps_offset,
                                              karras, final):  # fmt: skip
    # Where arange yields n + 1 points diffusers runs an extra step at t = -1 (documented).
    assume(spacing != "trailing" or len(np.arange(T, 0, -T / num_steps)) == num_steps)
    kwargs = {"spacing": spacing, "steps_offset": steps_offset, "use_karras_sigmas": karras}
    if family in ("dpm_solver", "unipc"):
        kwargs["final_sigmas_type"] = final
    try:
        timesteps, sigmas = solvers.solver_timesteps(family, SCHEDULES[schedule_name], num_steps, **kwargs)
    except ValueError as err:  # repeated timesteps
        assert "num_steps" in str(err) and not karras
        return
    scheduler = _diffusers_table(family, schedule_name, num_steps, kwargs)
    ref_t, ref_sigmas = scheduler.timesteps.numpy(), scheduler.sigmas.numpy()
    if family == "heun":  # diffusers repeats every level but the first and the last
        ref_t, ref_sigmas = ref_t[::2], np.append(ref_sigmas[::2], 0.0)
    if family in ("euler", "heun"):
        assert timesteps.dtype == np.float32
        # Karras: torch's pow(x, 0.5) differs from sqrt by 1 ulp at some training sigmas, which
        # moves the interpolated fractional timesteps by ~1e-5.
        np.testing.assert_allclose(timesteps, ref_t, rtol=0, atol=1e-3 if karras else 0)
    else:
        assert timesteps.dtype == np.int32
        np.testing.assert_array_equal(timesteps, ref_t)
    np.testing.assert_allclose(sigmas, ref_sigmas, rtol=3e-7)


@pytest.mark.parametrize("spacing", samplers.SPACINGS)
@pytest.mark.parametrize("num_steps", [1, 2, 10, 50])
def test_pndm_timesteps_equal_diffusers_plms(spacing, num_steps):
    offset = 1 if spacing == "leading" else 0
    timesteps, _ = solvers.solver_timesteps("pndm", SCHEDULES["linear"], num_steps, spacing=spacing,
                                            steps_offset=offset)  # fmt: skip
    scheduler = diffusers.PNDMScheduler(skip_prk_steps=True, timestep_spacing=spacing, steps_offset=offset)
    scheduler.set_timesteps(num_steps)
    plms = scheduler.timesteps.numpy()
    distinct = plms[np.r_[True, np.diff(plms) != 0]]  # diffusers evaluates its second level twice
    np.testing.assert_array_equal(timesteps, distinct)
    np.testing.assert_array_equal(timesteps, samplers.inference_timesteps(T, num_steps, spacing, offset))


def test_karras_cosine_rounds_where_diffusers_truncates():
    """Documented deviation: DPMSolverMultistepScheduler leaves Karras timesteps unrounded for the
    cosine schedule (its int64 cast truncates); jaxdiff rounds, as for the other schedules."""
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)
    scheduler.set_timesteps(20)
    timesteps, sigmas = solvers.solver_timesteps("dpm_solver", SCHEDULES["cosine"], 20, use_karras_sigmas=True)
    diff = timesteps - scheduler.timesteps.numpy()
    assert set(np.unique(diff)) <= {0, 1} and diff.any()
    np.testing.assert_allclose(sigmas, scheduler.sigmas.numpy(), rtol=1e-5)


def test_karras_sigmas_formula():
    sig = solvers.karras_sigmas(0.01, 80.0, 5)
    i = np.arange(5) / 4
    np.testing.assert_allclose(sig, (80.0 ** (1 / 7) + i * (0.01 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7)
    assert sig[0] == pytest.approx(80.0) and sig[-1] == pytest.approx(0.01)


# --------------------------------------------------------------------------- Gaussian data

MU, STD = 0.5, 0.5


def gaussian_eps(schedule):
    """The exact noise prediction for data N(MU, STD^2), at any (fractional) timestep.

    ``sigma(t)`` interpolates the training sigmas linearly in ``t``, as the samplers do.
    """
    table = jnp.asarray(_tables.schedule_sigmas(schedule, "test"))

    def eps_fn(x, t):
        t = t.astype(jnp.float32)
        low = jnp.clip(jnp.floor(t), 0, T - 2).astype(jnp.int32)
        w = t - low
        sigma = (1 - w) * table[low] + w * table[low + 1]
        sigma = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
        a = 1 / jnp.sqrt(1 + sigma**2)  # sqrt(abar)
        b = sigma * a
        x0 = MU + a * STD**2 * (x - a * MU) / (a**2 * STD**2 + b**2)
        return (x - a * x0) / b

    return eps_fn


GAUSSIAN_SAMPLERS = {
    "ddim": (samplers.ddim_sample, {}),
    "dpm++2m": (solvers.dpm_solver_sample, {}),
    "dpm++3m": (solvers.dpm_solver_sample, {"order": 3}),
    "dpm++2m_karras": (solvers.dpm_solver_sample, {"use_karras_sigmas": True}),
    "dpm++sde": (solvers.dpm_solver_sample, {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": (solvers.unipc_sample, {}),
    "euler": (solvers.euler_sample, {}),
    "euler_a": (solvers.euler_sample, {"ancestral": True}),
    "heun": (solvers.heun_sample, {}),
    "pndm": (solvers.pndm_sample, {}),
}
STOCHASTIC = ("dpm++sde", "euler_a")
GAUSSIAN_STEPS = (10, 20, 50)


def gaussian_errors(name: str, num_steps: int) -> tuple[float, float, bool]:
    """(|std - STD|, |mean - MU|, whether another key changes the result), linear schedule.

    Deterministic samplers are affine maps of x_T here (the exact denoiser is affine), so two
    points give the exact slope and offset; stochastic ones use 2^15 samples (standard errors:
    2e-3 for the std, 3e-3 for the mean). The key is varied at 10 steps only.
    """
    fn, kwargs = GAUSSIAN_SAMPLERS[name]
    s = SCHEDULES["linear"]
    if name in STOCHASTIC:
        x_T = jax.random.normal(jax.random.key(7), (256, 128))
    else:
        x_T = jnp.array([[0.0], [1.0]])
    run = jax.jit(lambda x, k: fn(gaussian_eps(s), s, x, k, num_steps=num_steps, **kwargs))
    x0 = run(x_T, KEY)
    key_matters = num_steps == 10 and not np.array_equal(x0, run(x_T, jax.random.key(99)))
    if name in STOCHASTIC:
        return abs(float(jnp.std(x0)) - STD), abs(float(jnp.mean(x0)) - MU), key_matters
    offset, slope = float(x0[0, 0]), float(x0[1, 0] - x0[0, 0])
    return abs(abs(slope) - STD), abs(offset - MU), key_matters


@pytest.fixture(scope="module")
def gaussian_table():
    return {(name, n): gaussian_errors(name, n) for name in GAUSSIAN_SAMPLERS for n in GAUSSIAN_STEPS}


@pytest.mark.parametrize("name", sorted(GAUSSIAN_SAMPLERS))
def test_gaussian_data_error_is_small_and_falls_with_steps(name, gaussian_table):
    std_err = [gaussian_table[name, n][0] for n in GAUSSIAN_STEPS]
    mean_err = [gaussian_table[name, n][1] for n in GAUSSIAN_STEPS]
    # At 50 steps; Euler ancestral (first order, stochastic) converges slowest. The mean error
    # floor (~2e-3) is the prior's: x_T ~ N(0, 1), where the exact x_T has mean sqrt(abar_T) MU.
    assert std_err[-1] < (0.07 if name == "euler_a" else 0.03), std_err
    assert max(mean_err) < (0.015 if name in STOCHASTIC else 5e-3), mean_err
    if name in STOCHASTIC:  # estimates: 20 and 50 steps can be within their noise
        assert std_err[0] > std_err[2] + 0.02, std_err
    else:
        assert std_err[0] > std_err[1] > std_err[2], std_err
    assert gaussian_table[name, 10][2] == (name in STOCHASTIC)  # only stochastic samplers read the key


def test_gaussian_data_high_order_beats_ddim(gaussian_table):
    """The point of the issue: at 20 steps the fast samplers are far closer than DDIM."""
    ddim = gaussian_table["ddim", 20][0]
    for name in ("dpm++2m", "dpm++3m", "unipc", "heun", "pndm"):
        assert gaussian_table[name, 20][0] < ddim / 2, (name, gaussian_table[name, 20], ddim)


# ------------------------------------------------------------------------ stochastic samplers


@pytest.mark.parametrize("fn,kwargs", [
    (solvers.dpm_solver_sample, {"algorithm_type": "sde-dpmsolver++"}),
    (solvers.euler_sample, {"ancestral": True}),
])  # fmt: skip
def test_stochastic_samplers_same_key_same_images(fn, kwargs):
    run = jax.jit(lambda x, k: fn(toy_eps, SCHEDULES["linear"], x, k, num_steps=6, **kwargs))
    a, b = run(X_T, jax.random.key(3)), run(X_T, jax.random.key(3))
    c = run(X_T, jax.random.key(4))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.max(jnp.abs(a - c))) > 1e-2


@pytest.mark.parametrize("family,kwargs", [
    ("dpm_solver", {"algorithm_type": "sde-dpmsolver++"}),
    ("euler", {"ancestral": True}),
])  # fmt: skip
def test_stochastic_samplers_match_diffusers_in_distribution(family, kwargs):
    """Gaussian data, exact denoiser: diffusers with torch's own noise and jaxdiff with JAX keys
    give the same mean and std (2^16 samples each, standard error ~1.4e-3)."""
    s = SCHEDULES["linear"]
    table = _tables.schedule_sigmas(s, "test").astype(np.float64)

    def exact_eps_torch(x, t):
        sigma = float(np.interp(float(t), np.arange(T), table))
        a = 1 / math.sqrt(1 + sigma**2)
        b = sigma * a
        x0 = MU + a * STD**2 * (x - a * MU) / (a**2 * STD**2 + b**2)
        return (x - a * x0) / b

    num_steps, shape = 20, (512, 128)
    cls, config = diffusers_config(family, kwargs)
    scheduler = cls(**config)
    scheduler.alphas_cumprod = torch.from_numpy(np.asarray(s.alphas_cumprod))
    scheduler.set_timesteps(num_steps)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = exact_eps_torch(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    ref = x.numpy()
    fn = SAMPLE_FUNCTIONS[family]
    x_T = jax.random.normal(jax.random.key(11), shape)
    run = jax.jit(lambda x, k: fn(gaussian_eps(s), s, x, k, num_steps=num_steps, **kwargs))
    ours = np.asarray(run(x_T, KEY))
    assert abs(ours.std() - ref.std()) < 6e-3 and abs(ours.mean() - ref.mean()) < 6e-3
    assert abs(ours.std() - STD) < 0.15  # their common error at 20 steps (Euler a: 0.11)


# --------------------------------------------------------------------------- one scan, traced once

ALL_SAMPLERS = [
    (solvers.dpm_solver_sample, {"order": 3}),
    (solvers.dpm_solver_sample, {"algorithm_type": "sde-dpmsolver++"}),
    (solvers.unipc_sample, {"order": 3}),
    (solvers.euler_sample, {"ancestral": True}),
    (solvers.heun_sample, {}),
    (solvers.pndm_sample, {}),
]


@pytest.mark.parametrize("fn,kwargs", ALL_SAMPLERS)
def test_one_scan_and_eps_fn_traced_once_whatever_num_steps(fn, kwargs):
    traces = {}
    for num_steps in (5, 50):
        calls = []

        def counting_eps(x, t):
            calls.append(t.dtype)
            return toy_eps(x, t)

        jaxpr = jax.make_jaxpr(lambda x, k: fn(counting_eps, SCHEDULES["linear"], x, k,
                                               num_steps=num_steps, **kwargs))(X_T, KEY)  # fmt: skip
        scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
        assert len(scans) == 1
        traces[num_steps] = calls
    assert len(traces[5]) == len(traces[50]) == 1
    float_t = fn in (solvers.euler_sample, solvers.heun_sample)
    assert traces[5][0] == (jnp.float32 if float_t else jnp.int32)


def test_jitted_with_params_as_arguments_traces_once():
    traces = []

    def eps_fn(params, x, t):
        traces.append(1)
        return params["w"] * toy_eps(x, t)

    run = jax.jit(lambda p, x, k: solvers.unipc_sample(functools.partial(eps_fn, p), SCHEDULES["linear"], x, k,
                                                       num_steps=8))  # fmt: skip
    a = run({"w": jnp.float32(1.0)}, X_T, KEY)
    b = run({"w": jnp.float32(0.5)}, X_T, KEY)
    assert len(traces) == 1 and not np.allclose(a, b)


# --------------------------------------------------------------------------------- errors


def test_clear_errors_where_diffusers_fails():
    s, x = SCHEDULES["linear"], jnp.asarray(X_T)
    with pytest.raises(ValueError, match="final_sigmas_type"):
        solvers.dpm_solver_sample(toy_eps, s, x, KEY, algorithm_type="dpmsolver")
    with pytest.raises(ValueError, match="lower_order_final"):
        solvers.unipc_sample(toy_eps, s, x, KEY, lower_order_final=False)
    with pytest.raises(ValueError, match="prediction_type"):
        solvers.euler_sample(toy_eps, s, x, KEY, ancestral=True, prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type"):
        solvers.pndm_sample(toy_eps, s, x, KEY, prediction_type="sample")
    with pytest.raises(ValueError, match="order"):
        solvers.dpm_solver_sample(toy_eps, s, x, KEY, order=4)
    with pytest.raises(ValueError, match="algorithm_type"):
        solvers.dpm_solver_sample(toy_eps, s, x, KEY, algorithm_type="sde-dpmsolver")
    with pytest.raises(ValueError, match="solver_type"):
        solvers.unipc_sample(toy_eps, s, x, KEY, solver_type="midpoint")
    with pytest.raises(ValueError, match="num_steps"):
        solvers.dpm_solver_sample(toy_eps, s, x, KEY, num_steps=1000)  # 1001 grid points on 1000
    with pytest.raises(ValueError, match="steps_offset"):
        solvers.euler_sample(toy_eps, s, x, KEY, spacing="leading", steps_offset=100)
    with pytest.raises(ValueError, match="num_steps"):
        solvers.heun_sample(toy_eps, s, x, KEY, num_steps=0)
    with pytest.raises(ValueError, match="concrete schedule"):
        jax.jit(lambda sch, x: solvers.euler_sample(toy_eps, sch, x, KEY))(s, x)
    with pytest.raises(TypeError, match="key"):
        solvers.heun_sample(toy_eps, s, x, None)


# ------------------------------------------------------------------------ diffusers configs


def _saved_config(cls, **overrides) -> dict:
    return json.loads(cls(**overrides).to_json_string())


@pytest.mark.parametrize("cls,overrides,sampler,expected", [
    (diffusers.DPMSolverMultistepScheduler, {"solver_order": 3, "use_karras_sigmas": True,
     "timestep_spacing": "leading", "steps_offset": 1}, "dpm_solver",
     {"order": 3, "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
      "use_karras_sigmas": True, "spacing": "leading", "steps_offset": 1, "prediction_type": "epsilon",
      "final_sigmas_type": "zero"}),
    (diffusers.UniPCMultistepScheduler, {"predict_x0": False, "solver_type": "bh1",
     "prediction_type": "v_prediction", "final_sigmas_type": "sigma_min"}, "unipc",
     {"order": 2, "solver_type": "bh1", "predict_x0": False, "lower_order_final": True,
      "use_karras_sigmas": False, "spacing": "linspace", "steps_offset": 0,
      "prediction_type": "v_prediction", "final_sigmas_type": "sigma_min"}),
    (diffusers.EulerDiscreteScheduler, {"use_karras_sigmas": True, "timestep_spacing": "trailing"}, "euler",
     {"ancestral": False, "use_karras_sigmas": True, "spacing": "trailing", "steps_offset": 0,
      "prediction_type": "epsilon"}),
    (diffusers.EulerAncestralDiscreteScheduler, {"steps_offset": 1}, "euler_ancestral",
     {"ancestral": True, "spacing": "linspace", "steps_offset": 1, "prediction_type": "epsilon"}),
    (diffusers.HeunDiscreteScheduler, {"prediction_type": "sample"}, "heun",
     {"use_karras_sigmas": False, "spacing": "linspace", "steps_offset": 0, "prediction_type": "sample"}),
    (diffusers.PNDMScheduler, {"skip_prk_steps": True, "steps_offset": 1}, "pndm",
     {"spacing": "leading", "steps_offset": 1, "prediction_type": "epsilon", "final_alpha_cumprod": None}),
    (diffusers.PNDMScheduler, {"set_alpha_to_one": True}, "pndm", {"final_alpha_cumprod": 1.0}),
])  # fmt: skip
def test_kwargs_from_saved_diffusers_configs(cls, overrides, sampler, expected):
    config = _saved_config(cls, **overrides)
    assert samplers.sampler_for_scheduler_class(config["_class_name"]) == sampler
    kwargs = samplers.kwargs_from_diffusers_config(config, sampler=sampler)
    assert {k: kwargs[k] for k in expected} == expected
    # The kwargs fit the function: no unknown keyword, no invalid value.
    out = jax.eval_shape(lambda x: samplers.SAMPLE_FUNCTIONS[sampler](
        toy_eps, SCHEDULES["linear"], x, KEY, num_steps=3, **kwargs), jnp.asarray(X_T))  # fmt: skip
    assert out.shape == X_T.shape


def test_diffusers_aliases():
    """diffusers runs DEIS configs as DPM-Solver++ and maps foreign solver types."""
    dpm = samplers.kwargs_from_diffusers_config({"algorithm_type": "deis", "solver_type": "bh2"},
                                                sampler="dpm_solver")  # fmt: skip
    assert dpm["algorithm_type"] == "dpmsolver++" and dpm["solver_type"] == "midpoint"
    unipc = samplers.kwargs_from_diffusers_config({"solver_type": "midpoint"}, sampler="unipc")
    assert unipc["solver_type"] == "bh2"
    assert samplers.kwargs_from_diffusers_config({}, sampler="pndm")["spacing"] == "leading"
    assert samplers.kwargs_from_diffusers_config({"sigma_min": None}, sampler="euler")["spacing"] == "linspace"


def test_config_mapping_reproduces_diffusers_end_to_end(monkeypatch):
    """A saved config -> schedules.from_diffusers_config + kwargs -> equals that diffusers scheduler."""
    config = _saved_config(diffusers.DPMSolverMultistepScheduler, beta_schedule="scaled_linear",
                           beta_start=0.00085, beta_end=0.012, solver_order=2, use_karras_sigmas=True,
                           timestep_spacing="leading", steps_offset=1)  # fmt: skip
    s = schedules.from_diffusers_config(config)
    name = samplers.sampler_for_scheduler_class(config["_class_name"])
    kwargs = samplers.kwargs_from_diffusers_config(config, s, sampler=name)
    x0 = samplers.SAMPLE_FUNCTIONS[name](toy_eps, s, jnp.asarray(X_T), KEY, num_steps=12, **kwargs)
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(config)
    scheduler.set_timesteps(12)
    x = torch.from_numpy(X_T)
    for t in scheduler.timesteps:
        x = scheduler.step(toy_eps_torch(x, t), t, x).prev_sample
    assert relative_error([np.asarray(x0)], [x.numpy()]) < 1e-4  # float32 vs float64 cumprod


def test_unsupported_scheduler_settings_raise():
    with pytest.raises(ValueError, match="LMSDiscreteScheduler.*DPMSolverMultistepScheduler"):
        samplers.sampler_for_scheduler_class("LMSDiscreteScheduler")
    cases = [
        (diffusers.DPMSolverMultistepScheduler, {"thresholding": True}, "dpm_solver", "thresholding"),
        (diffusers.DPMSolverMultistepScheduler, {"euler_at_final": True}, "dpm_solver", "euler_at_final"),
        (diffusers.DPMSolverMultistepScheduler, {"lambda_min_clipped": -5.1}, "dpm_solver", "lambda_min_clipped"),
        (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver"}, "dpm_solver", "sde-dpmsolver"),
        (diffusers.UniPCMultistepScheduler, {"disable_corrector": [0]}, "unipc", "disable_corrector"),
        (diffusers.EulerDiscreteScheduler, {"use_exponential_sigmas": True}, "euler", "use_exponential_sigmas"),
        (diffusers.EulerDiscreteScheduler, {"timestep_type": "continuous"}, "euler", "timestep_type"),
        (diffusers.HeunDiscreteScheduler, {"clip_sample": True}, "heun", "clip_sample"),
    ]  # fmt: skip
    for cls, overrides, sampler, match in cases:
        with pytest.raises(ValueError, match=match):
            samplers.kwargs_from_diffusers_config(_saved_config(cls, **overrides), sampler=sampler)


def test_ddim_and_ddpm_mapping_unchanged():
    cfg = {"variance_type": "fixed_small", "set_alpha_to_one": False, "clip_sample": False}
    s = SCHEDULES["linear"]
    assert samplers.kwargs_from_diffusers_config(cfg, s) == {
        "prediction_type": "epsilon", "clip_sample": False, "clip_sample_range": 1.0,
        "spacing": "leading", "steps_offset": 0, "final_alpha_cumprod": float(s.alphas_cumprod[0])}  # fmt: skip
    assert samplers.kwargs_from_diffusers_config(cfg, s, sampler="ddpm")["variance_type"] == "fixed_small"
    with pytest.raises(ValueError, match="sampler"):
        samplers.kwargs_from_diffusers_config(cfg, s, sampler="lms")
