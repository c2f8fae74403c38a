"""One tolerance rule for comparing two computations of the same floating-point result."""
import torch


def assert_close_f32(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, msg: str | None = None) -> None:
    """``actual`` equals ``expected`` up to rounding, relative to the scale of ``expected``:
    ``rtol=rel`` and ``atol=rel * max|expected|`` (over its finite values; the smallest
    normal float32 when they are all 0).

    Why: two code paths computing the same float32 result (blocked vs one call, chunked vs
    whole, batched vs per item, oneDNN vs BLAS, compiled vs eager, a float64 oracle) sum in
    different orders, and how differently they round depends on the CPU's kernels (BLAS,
    oneDNN, ATen's vectorised code): Swin inference in blocks and in one call differed by
    1.18e-6 on an AMD EPYC. A fixed absolute 1e-6 is a few ulps of an output of magnitude
    1-10, and an element near 0 (a sum that cancels) carries the rounding error of the
    output's scale, not of its own magnitude: the tolerance follows the compared output's
    scale. ``rel=1e-5`` is ~80 float32 ulps of the largest value (~1e-4 suits a whole model's
    chain of layers); a wrong formula is off at the scale of the output. Float64 inputs (a
    float64 oracle against a float32 result cast up) take the same rule. Where both sides
    run the same code on the same input (a gather, a copy, the same function twice), compare
    bitwise instead (``torch.equal``)."""
    e = expected.detach()
    finite = e[torch.isfinite(e)] if e.is_floating_point() or e.is_complex() else e
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    atol = rel * max(scale, torch.finfo(torch.float32).tiny)

    def message(default: str) -> str:
        head = f"{msg}: " if msg else ""
        a = actual.detach()
        if a.shape == e.shape and a.dtype == e.dtype and a.device == e.device and e.numel():
            worst = float((a.double() - e.double()).abs().nan_to_num(nan=float("inf")).max())  # NaN: inf
            detail = f"largest difference {worst:.3g}, allowed {atol:.3g} + {rel:g} x |expected|"
        else:  # shape, dtype or device differ: the default message says which
            detail = "not compared element-wise"
        return f"{head}{detail} (scale max|expected| = {scale:.3g}, rel = {rel:g})\n{default}"

    torch.testing.assert_close(actual, expected, rtol=rel, atol=atol, msg=message)
