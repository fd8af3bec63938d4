"""The SLERP kernel against a float64 evaluation of the formula and FusionBench's op order."""

from __future__ import annotations

import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_helpers import (
    BRANCH_MARGIN,
    DEVICES,
    EXACT_D,
    float64_cosine,
    fusionbench_d,
    near_parallel_pair,
)

from slerp_plugin.kernel import (
    DEFAULT_CHUNK_ELEMENTS,
    SlerpStats,
    accumulate,
    accumulate_chunks,
    coefficients,
    compute_dtype,
    slerp,
    slerp_reference,
    slerp_with_coefficients,
)
from slerp_plugin.validate import ulp_distance

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def formula_f64(t, a, b, tau=0.9995, eps=1e-8):
    """REFERENCE.md §1 evaluated in float64, independent of both implementations."""
    a = a.double().reshape(-1)
    b = b.double().reshape(-1)
    na, nb = a.norm().item(), b.norm().item()
    ah = a / na if na > eps else a
    bh = b / nb if nb > eps else b
    d = float((ah * bh).sum())
    if abs(d) > tau:
        return (1 - t) * a + t * b, 1 - t, t, "lerp"
    th0 = math.acos(d)
    s0 = math.sin(th0 - th0 * t) / math.sin(th0)
    s1 = math.sin(th0 * t) / math.sin(th0)
    return s0 * a + s1 * b, s0, s1, "slerp"


def pair(shape, dtype, seed, rel_noise=0.5):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g, dtype=torch.float64)
    b = a + rel_noise * torch.randn(shape, generator=g, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
    t=st.floats(0.0, 1.0),
    noise=st.sampled_from([0.01, 0.3, 2.0]),
    seed=st.integers(0, 2**16),
    chunk=st.sampled_from([1024, 1 << 22]),
)
def test_kernel_matches_float64_formula(shape, dtype, t, noise, seed, chunk):
    a, b = pair(shape, dtype, seed, noise)
    got, coeff = slerp_with_coefficients(t, a, b, chunk_elements=chunk)
    assert got.dtype == compute_dtype(dtype) and got.shape == a.shape
    want, s0, s1, branch = formula_f64(t, a, b)
    assert coeff.branch == branch
    bound = rounding_bound(a, b, coeff)
    assert torch.all((got.double().reshape(-1) - want).abs() <= bound + 1e-30)


def rounding_bound(a, b, coeff):
    """Per element, how far a compute-dtype evaluation of ``s0·A + s1·B`` may lie from the exact one.

    The scalars are computed in the compute dtype (unit roundoff u) as FusionBench does: θ₀ =
    arccos d amplifies d's rounding by 1/sin θ₀, and θ₀ − θₜ cancels as t → 1, so each coefficient
    carries an absolute error of a few u·(θ₀/sin θ₀ + 1/sin²θ₀); each product adds a few u of
    itself. The bound scales with the terms, not with the result: where s0·A and s1·B nearly
    cancel, the result's relative error is unbounded.
    """
    u = 2.0**-52 if compute_dtype(a.dtype) == torch.float64 else 2.0**-23
    coeff_err = 4 * u
    if coeff.branch == "slerp":
        theta = math.acos(max(-1.0, min(1.0, coeff.d)))
        coeff_err *= theta / math.sin(theta) + 1 / math.sin(theta) ** 2
    a64, b64 = a.double().abs().reshape(-1), b.double().abs().reshape(-1)
    return coeff_err * (a64 + b64) + 4 * u * (abs(float(coeff.s0)) * a64 + abs(float(coeff.s1)) * b64)


def ulp_of(x: torch.Tensor) -> torch.Tensor:
    """The spacing of ``x``'s (16-bit float) dtype at each element of ``x``, as float64."""
    info = torch.finfo(x.dtype)
    x64 = x.double().abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(x64))) * info.eps


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 5000),
    dtype=st.sampled_from(DTYPES),
    t=st.floats(0.0, 1.0),
    noise=st.sampled_from([0.001, 0.1, 1.0, 5.0]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_fusionbench_op_order(n, dtype, t, noise, seed):
    """REFERENCE.md §1 tolerance: bf16/fp16 ≤ 1 ulp after the cast; fp32 relative ≤ 1e-6 — except
    where s0·A and s1·B nearly cancel: there two float32 evaluations differ by their rounding
    (:func:`rounding_bound`, once per side), which can be several ulps of a tiny 16-bit result."""
    a, b = pair((n,), dtype, seed, noise)
    got, coeff = slerp_with_coefficients(t, a, b, chunk_elements=1024)
    ref = slerp_reference(t, a, b)
    assert got.dtype == ref.dtype
    if dtype in (torch.bfloat16, torch.float16):
        g, r = got.to(dtype).reshape(-1), ref.to(dtype).reshape(-1)
        one_ulp = ulp_distance(g, r) <= 1
        cancelled = (g.double() - r.double()).abs() <= 2 * rounding_bound(a, b, coeff) + ulp_of(r)
        assert torch.all(one_ulp | cancelled)
    else:
        scale = (a.double().abs() + b.double().abs())
        rel = 1e-6 if dtype == torch.float32 else 1e-12
        assert torch.all((got.double() - ref.double()).abs() <= rel * scale + 1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise", [0.5, 1e-4])  # slerp branch, lerp branch
def test_endpoints_bit_exact(dtype, noise):
    a, b = pair((33, 17), dtype, 1, noise)
    assert torch.equal(slerp(0.0, a, b).to(dtype), a)
    assert torch.equal(slerp(1.0, a, b).to(dtype), b)


def test_identical_tensors_take_lerp_and_return_the_tensor():
    a = torch.ones(64, dtype=torch.bfloat16)  # an RMSNorm weight
    out, coeff = slerp_with_coefficients(0.37, a, a.clone())
    assert coeff.branch == "lerp"
    assert torch.equal(out.to(torch.bfloat16), a)


@pytest.mark.parametrize("sign", [1, -1])
def test_lerp_fallback_in_both_directions(sign):
    a, _ = pair((1000,), torch.float32, 3)
    b = sign * a + 1e-3 * torch.randn(1000, generator=torch.Generator().manual_seed(4))
    out, coeff = slerp_with_coefficients(0.25, a, b)
    assert coeff.branch == "lerp" and abs(coeff.d) > 0.9995 and (coeff.d > 0) == (sign > 0)
    torch.testing.assert_close(out, 0.75 * a + 0.25 * b, rtol=0, atol=1e-6)


def test_antiparallel_at_half_gives_zero():
    a, _ = pair((257,), torch.float32, 5)
    out = slerp(0.5, a, -a)
    assert torch.count_nonzero(out) == 0


def test_zero_tensor_is_not_normalised():
    b, _ = pair((500,), torch.float32, 6)
    a = torch.zeros_like(b)
    out, coeff = slerp_with_coefficients(0.5, a, b)
    assert coeff.branch == "unnormalised" and coeff.d == 0.0
    # d = 0 → θ₀ = π/2 → r = sin(π/4)·B ≈ 0.7071·B, not 0.5·B
    torch.testing.assert_close(out, math.sin(math.pi / 4) * b, rtol=1e-6, atol=0)
    torch.testing.assert_close(out, slerp_reference(0.5, a, b), rtol=0, atol=0)


def test_epsilon_rule_below_threshold_uses_unnormalised_vector():
    g = torch.Generator().manual_seed(7)
    a = torch.randn(300, generator=g) * 1e-12  # ‖a‖ ≈ 2e-11 ≤ ε
    b = torch.randn(300, generator=g)
    out, coeff = slerp_with_coefficients(0.3, a, b, epsilon=1e-8)
    assert coeff.branch == "unnormalised"
    torch.testing.assert_close(out, slerp_reference(0.3, a, b, epsilon=1e-8), rtol=1e-6, atol=1e-12)
    # with a smaller epsilon the same tensor is normalised and the result changes
    out2, coeff2 = slerp_with_coefficients(0.3, a, b, epsilon=1e-20)
    assert coeff2.branch == "slerp" and not torch.allclose(out, out2)


def test_float64_stays_float64_and_low_precision_computes_in_float32():
    a, b = pair((10,), torch.float64, 8)
    assert slerp(0.5, a, b).dtype == torch.float64
    a, b = pair((10,), torch.float16, 8)
    assert slerp(0.5, a, b).dtype == torch.float32


def test_dot_threshold_one_never_produces_nan():
    a, _ = pair((100,), torch.float32, 9)
    out = slerp(0.5, a, a.clone(), DOT_THRESHOLD=1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, a)


def test_dot_threshold_small_forces_lerp():
    a, b = pair((100,), torch.float32, 10, rel_noise=3.0)
    _, coeff = slerp_with_coefficients(0.5, a, b, DOT_THRESHOLD=1e-6)
    assert coeff.branch == "lerp"


def test_chunked_passes_equal_one_pass_statistics():
    a, b = pair((10_000,), torch.float32, 11)
    whole = accumulate(a, b)
    parts = SlerpStats()
    for s in range(0, 10_000, 1024):
        parts = parts + accumulate(a[s : s + 1024], b[s : s + 1024])
    assert parts.dot == pytest.approx(whole.dot, rel=1e-6)
    c1 = coefficients(0.4, whole)
    c2 = coefficients(0.4, parts)
    assert c1.branch == c2.branch
    assert float(c1.s0) == pytest.approx(float(c2.s0), rel=1e-6)


def test_pass_one_over_chunks_is_the_exactly_rounded_sum_of_the_chunk_sums():
    a, b = pair((10_000,), torch.float32, 12)
    chunks = [(a[s : s + 1024], b[s : s + 1024]) for s in range(0, 10_000, 1024)]
    per_chunk = [accumulate(x, y) for x, y in chunks]
    want = SlerpStats(*(math.fsum(getattr(c, f) for c in per_chunk) for f in ("sumsq_a", "sumsq_b", "dot")))
    assert accumulate_chunks(chunks) == want  # bit for bit, whatever the order of the additions
    assert accumulate_chunks([]) == SlerpStats()
    # float64 chunks are summed as they are; other dtypes are widened first (products exact)
    wide = [(x.double(), y.double()) for x, y in chunks]
    assert accumulate_chunks(wide) == accumulate_chunks(chunks)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape mismatch"):
        slerp(0.5, torch.zeros(3), torch.zeros(4))


SIZES = [3, 1000, (1 << 19) + 17, 3 * (1 << 20) + 5]  #: elements: within one chunk, just over one, several


def cosine_pair(n: int, dtype: torch.dtype, kind: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n``-element tensors that are nearly parallel, unrelated (d ≈ 0: all cancellation) or
    anti-parallel, with magnitudes spread over several orders (within float16's range)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp(1.5 * torch.randn(n, generator=g,
                                                                                   dtype=torch.float64))
    noise = torch.randn(n, generator=g, dtype=torch.float64) * a.abs().mean()
    b = {"near-parallel": a + 1e-3 * noise, "unrelated": noise, "anti-parallel": -a + 1e-3 * noise}[kind]
    return a.to(dtype), b.to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["near-parallel", "unrelated", "anti-parallel"])
def test_d_is_the_float64_cosine(kind, n, dtype, device):
    a, b = cosine_pair(n, dtype, kind)
    want = float64_cosine(a, b)
    for chunk in (DEFAULT_CHUNK_ELEMENTS, 4099):
        _, coeff = slerp_with_coefficients(0.4, a.to(device), b.to(device), chunk_elements=chunk)
        assert abs(coeff.d - want) <= EXACT_D, (coeff.d, want)
        assert coeff.norm_precision == "float64"


@pytest.mark.parametrize("device", DEVICES)
def test_d_is_the_float64_cosine_for_the_largest_tensor_tested(device):
    """16 Mi bf16 elements (32 chunks): as far as the tests can afford; a 72B model's largest is 1.2 G."""
    a, b = near_parallel_pair(rows=4096, cols=4096 + 1)
    _, coeff = slerp_with_coefficients(0.5, a.to(device), b.to(device))
    assert abs(coeff.d - float64_cosine(a, b)) <= EXACT_D


@pytest.mark.parametrize("side", ["above", "below"])
def test_the_branch_near_the_threshold_follows_the_float64_cosine(side):
    a, b = near_parallel_pair()
    d = float64_cosine(a, b)
    assert 1 - 1e-4 < d < 1 - 2 * BRANCH_MARGIN  # the pair is as near-parallel as meant
    tau, branch = (d - BRANCH_MARGIN, "lerp") if side == "above" else (d + BRANCH_MARGIN, "slerp")
    out, coeff = slerp_with_coefficients(0.3, a, b, tau)
    assert coeff.branch == branch and abs(coeff.d - d) <= EXACT_D
    assert torch.equal(out, slerp_reference(0.3, a, b, tau, norm_precision="float64"))


@pytest.mark.parametrize("offset", [-BRANCH_MARGIN, 0.0, BRANCH_MARGIN])
def test_norm_precision_float32_is_fusionbench_run_on_this_machine(offset):
    """Parity with FusionBench's op order here, whichever branch this host's float32 d gives."""
    a, b = near_parallel_pair()
    tau = float64_cosine(a, b) + offset
    fb_d = fusionbench_d(a, b)
    fb, coeff = slerp_with_coefficients(0.3, a, b, tau, norm_precision="float32")
    assert coeff.norm_precision == "float32" and coeff.d == float(fb_d)
    assert coeff.branch == ("lerp" if bool(torch.abs(fb_d) > tau) else "slerp")
    assert torch.equal(fb, slerp_reference(0.3, a, b, tau))  # FusionBench's op order, bit for bit
    exact, exact_coeff = slerp_with_coefficients(0.3, a, b, tau)
    if exact_coeff.branch != coeff.branch:  # this host's float32 d is on the other side of tau
        assert not torch.equal(fb.to(torch.bfloat16), exact.to(torch.bfloat16))


#: the exactness and branch tests above, as run again under each float code path (no 3M-element pairs)
NUMERIC_TESTS = "(float64_cosine and not 3145733 and not largest) or follows_the_float64 or this_machine"
SWITCHES = "SLERP_TEST_FLOAT_PATHS"  #: set in the runs under switches: their names, comma-separated


def float_code_paths() -> dict[str, dict[str, str]]:
    """This host's float code paths other than its default, as the switches that select them:
    torch's kernels (``ATEN_CPU_CAPABILITY``), MKL's (``MKL_CBWR``) and numpy's OpenBLAS
    (``OPENBLAS_CORETYPE``), each at its most generic level and, where the CPU has AVX-512, at AVX2."""
    x86 = platform.machine() in ("x86_64", "AMD64")
    paths = {"generic": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE",
                         **({"OPENBLAS_CORETYPE": "Prescott"} if x86 else {})}}
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        paths["avx2"] = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "OPENBLAS_CORETYPE": "Haswell"}
    return paths


@pytest.mark.skipif(SWITCHES in os.environ, reason="this run is itself under switches")
def test_the_numeric_tests_pass_under_every_float_code_path_of_this_host():
    root = Path(__file__).resolve().parents[1]
    runs = {}
    for label, switches in float_code_paths().items():
        env = {**os.environ, **switches, SWITCHES: ",".join(switches)}
        cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(Path(__file__)),
               "-k", f"({NUMERIC_TESTS}) or float_code_path_is_in_effect"]
        runs[label] = subprocess.Popen(cmd, cwd=root, env=env, text=True, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT)
    for label, proc in runs.items():
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0 and " failed" not in out, f"{label}:\n{out[-3000:]}"
        passed = re.search(r"(\d+) passed", out)
        assert passed and int(passed[1]) >= 30, f"{label}: not every numeric test ran:\n{out[-3000:]}"
        assert "PASSED tests/test_kernel.py::test_the_float_code_path_is_in_effect" in out, out[-3000:]


@pytest.mark.skipif(SWITCHES not in os.environ, reason="only in the runs under switches")
def test_the_float_code_path_is_in_effect():
    names = os.environ[SWITCHES].split(",")
    assert names and all(os.environ.get(n) for n in names)
    if "ATEN_CPU_CAPABILITY" in names:
        assert torch.backends.cpu.get_cpu_capability() == os.environ["ATEN_CPU_CAPABILITY"].upper()


def test_coefficients_from_d_rounds_d_to_the_compute_dtype_as_fusionbench_does():
    from slerp_plugin.kernel import coefficients_from_d

    just_above = 0.9995 + 1e-12  # the same float32 as 0.9995: not above the threshold in float32
    c = coefficients_from_d(0.5, just_above, 1.0, 1.0)
    assert c.branch == "slerp" and c.d == just_above  # the record keeps d as it was computed
    assert float(c.s0) == float(coefficients_from_d(0.5, 0.9995, 1.0, 1.0).s0)  # the angle: float32 d
    assert coefficients_from_d(0.5, 0.99951, 1.0, 1.0).branch == "lerp"
    assert coefficients_from_d(0.5, 0.3, 1e-9, 1.0).branch == "unnormalised"
