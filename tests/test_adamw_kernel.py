"""The one-kernel AdamW of train/adamw.py (environment.triton_adamw, a CUDA default), run by
Triton's interpreter on the CPU against torch's fused AdamW: the GPU runs the same kernel code
(bench/throughput.py --check compares the two there, with their speed)."""

from __future__ import annotations

import textwrap

SCRIPT = textwrap.dedent("""
    import json, torch
    from trainer_core.train.adamw import BLOCK, adamw_step, supported

    def model():
        torch.manual_seed(0)
        # sizes that end inside a block, span several, and a scalar-sized one
        return [torch.nn.Parameter(torch.randn(n)) for n in (BLOCK + 5, 3 * BLOCK, 7, 1000)]

    def optimizer(params):
        return torch.optim.AdamW([{"params": params[:2], "weight_decay": 0.1},
                                  {"params": params[2:], "weight_decay": 0.0}],
                                 lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True)

    ref, new = model(), model()
    opt_ref, opt_new = optimizer(ref), optimizer(new)
    out = {"supported": supported(opt_new), "max_diff": [], "steps": []}
    for step in range(5):
        grads = [torch.randn_like(p) for p in ref]
        lr = 1e-2 / (step + 1)  # the schedule moves; step 3 passes it as a tensor (a graph does)
        for opt, params in ((opt_ref, ref), (opt_new, new)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            for grp in opt.param_groups:
                grp["lr"] = torch.tensor(lr) if (opt is opt_new and step == 3) else lr
            opt.grad_scale = torch.tensor(1.7)  # the clip
            opt.found_inf = torch.tensor(1.0 if step == 2 else 0.0)  # step 2 is skipped
        opt_ref.step()
        for grp in opt_ref.param_groups:
            grp["lr"] = float(grp["lr"])
        if step == 0:
            opt_new.step()  # no state yet: the kernel's caller takes torch's step
        else:
            before = [p.detach().clone() for p in new]
            adamw_step(opt_new)
            out.setdefault("moved", []).append(
                any(not torch.equal(a, b) for a, b in zip(before, new)))
        out["max_diff"].append(max(float((a - b).abs().max() / b.abs().max())
                                   for a, b in zip(new, ref)))
        out["moment_diff"] = max(
            float((opt_new.state[a][k] - opt_ref.state[b][k]).abs().max())
            for a, b in zip(new, ref) for k in ("exp_avg", "exp_avg_sq"))
        out["steps"].append([float(opt_new.state[p]["step"]) for p in new]
                            + [float(opt_ref.state[p]["step"]) for p in ref])
    print(json.dumps(out))
""")


def test_triton_adamw_kernel_equals_torch_fused_adamw(triton_interpreter):
    out = triton_interpreter(SCRIPT)
    assert out["supported"]
    assert out["moved"] == [True, False, True, True]  # step 2 (found_inf) changed nothing
    assert max(out["max_diff"]) < 1e-6, out["max_diff"]  # float32 rounding only
    assert out["moment_diff"] < 1e-6
    # every tensor's step counter as torch keeps it (the skipped step not counted)
    assert out["steps"][-1] == [4.0] * 8 and out["steps"][2] == [2.0] * 8
