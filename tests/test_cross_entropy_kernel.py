"""The fused loss's Triton chunk kernel (model/cross_entropy.py, environment.triton_cross_entropy,
a CUDA default), run by Triton's interpreter on the CPU against the formula the compiled path
uses: the GPU runs the same kernel code (bench/throughput.py times it there)."""

from __future__ import annotations

import textwrap

SCRIPT = textwrap.dedent("""
    import json, torch
    from trainer_core.model.cross_entropy import BLOCK, ce_loss_and_grad_inplace
    from trainer_core.model.fused_loss import _ce_loss_and_grad

    g = torch.Generator().manual_seed(0)
    vocab = BLOCK + 904  # the last block is partial
    logits = (torch.randn(6, vocab, generator=g) * 4).to(torch.bfloat16)
    logits[2, 17] = 60.0  # one dominant logit: the running maximum must rescale the sum
    targets = torch.tensor([3, vocab - 1, 17, -100, BLOCK, 0])  # -100: padding, no loss
    ref_loss, ref_grad = _ce_loss_and_grad(logits.clone(), targets)
    buf = logits.clone()
    loss, grad = ce_loss_and_grad_inplace(buf, targets)
    print(json.dumps({
        "in_place": grad.data_ptr() == buf.data_ptr(),
        "dtype": str(grad.dtype),
        "loss": float(loss), "ref_loss": float(ref_loss),
        "grad_diff": float((grad.float() - ref_grad.float()).abs().max()),
        "padded_row_zero": bool((grad[3] == 0).all()),
        "row_sums": [float(x) for x in grad.float().sum(1)],
        "empty": float(ce_loss_and_grad_inplace(buf[:0], targets[:0])[0]),
    }))
""")


def test_triton_cross_entropy_kernel_equals_the_formula(triton_interpreter):
    out = triton_interpreter(SCRIPT)
    assert out["in_place"] and out["dtype"] == "torch.bfloat16"
    assert abs(out["loss"] - out["ref_loss"]) < 1e-4 * abs(out["ref_loss"])
    assert out["grad_diff"] < 1e-2  # bf16 rounding of values in [-1, 1]
    assert out["padded_row_zero"]
    # softmax - onehot sums to zero on every row (up to bf16 rounding)
    assert max(abs(x) for x in out["row_sums"]) < 0.05
    assert out["empty"] == 0.0
