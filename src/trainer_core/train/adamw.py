"""AdamW in one persistent Triton kernel over every parameter (``environment.triton_adamw``).

torch's fused AdamW is 33 launches over Qwen3-0.6B's 311 tensors (at most 320 blocks of 64k
elements each), and streamed its 16.7 GB per step at 2.3 TB/s on an H100: 7.3 ms of a 51 ms
step at 8 examples per step, the largest piece after the GEMMs. Here one launch of a few
programs per SM walks a table of fixed-size blocks of every tensor, so no launch ends in a
half-empty wave.

Same update as ``torch.optim.AdamW(fused=True)``, on the same state tensors (``exp_avg``,
``exp_avg_sq``, ``step``: checkpoints and the other update paths see no difference), with the
same hooks: gradients divided by ``optimizer.grad_scale`` (the clip) and the whole update
skipped, step counters included, when ``optimizer.found_inf`` is 1. A group's learning rate
may be a device tensor: a CUDA graph records the kernel, the schedule changes the tensor.

The kernel addresses every tensor as an element offset from one base tensor. The blocks'
table depends only on the parameters' sizes and is built once; the tensors' offsets are
rebuilt when an address changes (eager steps whose ``.grad`` was freed) and kept for every
set captured in a CUDA graph, whose replays copy them in again from pinned memory that
therefore stays alive.

Only for float32 parameters, gradients and state on one CUDA device, with one pair of betas
and one eps and no amsgrad or maximize: :func:`supported`.
"""

from __future__ import annotations

from typing import Any

#: Elements per block. 8 warps x 32 threads x 16 floats.
BLOCK = 4096
#: Offsets are multiples of this many elements (64 bytes: the loads can be vectorised).
ALIGN = 16

_kernel: Any = None


def supported(optimizer: Any) -> bool:
    """Whether :func:`adamw_step` can update ``optimizer``'s parameters."""
    import torch

    groups = optimizer.param_groups
    if not isinstance(optimizer, torch.optim.AdamW):
        return False
    if len({(tuple(g["betas"]), g["eps"]) for g in groups}) != 1:
        return False
    if any(g.get("amsgrad") or g.get("maximize") or g.get("differentiable") for g in groups):
        return False
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.dtype == torch.float32 and p.is_contiguous()
                                and p.device == params[0].device for p in params)


class _Plan:
    """What one optimizer's kernel launches need that does not change from step to step."""

    def __init__(self, optimizer: Any, params: list[Any]) -> None:
        import numpy as np

        groups = optimizer.param_groups
        self.state_key = _state_key(optimizer, params)
        sizes = np.array([p.numel() for p in params], dtype=np.int64)
        blocks = -(-sizes // BLOCK)
        self.n_blocks = int(blocks.sum())
        tensor_of = np.repeat(np.arange(len(params), dtype=np.int64), blocks)
        first = np.concatenate([[0], np.cumsum(blocks)[:-1]])
        start = (np.arange(self.n_blocks, dtype=np.int64) - first[tensor_of]) * BLOCK
        # (the pinned sources stay referenced: a copy recorded in a CUDA graph reads them again)
        self.host = [_pinned(np.stack([tensor_of, start], axis=1)),
                     _pinned(np.array([g["weight_decay"] for g in groups], dtype=np.float32))]
        self.blocks, self.wds = (t.to(params[0].device, non_blocking=True) for t in self.host)
        self.wd_values = [g["weight_decay"] for g in groups]
        self.group_of = [i for i, g in enumerate(groups) for _ in g["params"]]
        self.offsets: dict[tuple[int, ...], tuple[Any, Any]] = {}
        self.eager_key: tuple[int, ...] | None = None


_plans: dict[int, _Plan] = {}


def adamw_step(optimizer: Any, grads: list[Any] | None = None) -> None:
    """One AdamW step of ``optimizer`` (see the module doc), reading ``grads`` (one per
    parameter, in the groups' order; default: each parameter's ``.grad``)."""
    import torch

    groups = optimizer.param_groups
    params = [p for g in groups for p in g["params"]]
    grads = [p.grad for p in params] if grads is None else grads
    state = optimizer.state
    if any(g is None for g in grads) or any("step" not in state.get(p, ()) for p in params):
        optimizer.step()  # a parameter without a gradient, or no state yet: torch's own step
        return
    plan = _plans.get(id(optimizer))
    if (plan is None or plan.state_key != _state_key(optimizer, params)
            or plan.wd_values != [g["weight_decay"] for g in groups]):
        plan = _plans[id(optimizer)] = _Plan(optimizer, params)
    offsets = _offsets(plan, optimizer, params, grads)
    steps = [optimizer.state[p]["step"] for p in params]
    torch._foreach_add_(steps, 1)
    lrs = _learning_rates(groups, params[0].device)
    scale = getattr(optimizer, "grad_scale", None)
    found_inf = getattr(optimizer, "found_inf", None)
    beta1, beta2 = groups[0]["betas"]
    programs = min(plan.n_blocks, 4 * _processors(params[0].device))
    _compiled()[(programs,)](
        params[0], plan.blocks, plan.n_blocks, offsets, lrs, plan.wds,
        scale if scale is not None else lrs, found_inf if found_inf is not None else lrs,
        float(beta1), float(beta2), float(groups[0]["eps"]),
        ITERS=-(-plan.n_blocks // programs), BLOCK=BLOCK, HAS_SCALE=scale is not None, HAS_INF=found_inf is not None, num_warps=8)
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf] * len(steps))


def _state_key(optimizer: Any, params: list[Any]) -> tuple[int, ...]:
    state = optimizer.state
    return tuple(t.data_ptr() for p in params
                 for t in (p, state[p]["exp_avg"], state[p]["exp_avg_sq"], state[p]["step"]))


def _offsets(plan: _Plan, optimizer: Any, params: list[Any], grads: list[Any]) -> Any:
    """Each tensor's row ``[p, g, m, v, step offsets, numel, group, 0]`` on the device."""
    import numpy as np
    import torch

    capturing = params[0].is_cuda and torch.cuda.is_current_stream_capturing()
    key = tuple(g.data_ptr() for g in grads)
    if key in plan.offsets:
        return plan.offsets[key][1]
    state, origin = optimizer.state, params[0].data_ptr()
    rows = np.zeros((len(params), 8), dtype=np.int64)
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        m, v, s = state[p]["exp_avg"], state[p]["exp_avg_sq"], state[p]["step"]
        for col, t in enumerate((p, g, m, v)):
            delta = t.data_ptr() - origin
            if (t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != p.numel()
                    or delta % (4 * ALIGN)):
                raise ValueError("triton AdamW needs contiguous, 64-byte aligned float32 "
                                 "parameters, gradients and state")
            rows[i, col] = delta // 4
        if s.dtype != torch.float32 or (s.data_ptr() - origin) % 4:
            raise ValueError("triton AdamW needs float32 step counters")
        rows[i, 4] = (s.data_ptr() - origin) // 4
        rows[i, 5] = p.numel()
        rows[i, 6] = plan.group_of[i]
    host = _pinned(rows)
    device = host.to(params[0].device, non_blocking=True)
    if not capturing:  # one eager set at a time: grads freed between steps get new addresses
        plan.offsets.pop(plan.eager_key, None)  # type: ignore[arg-type]
        plan.eager_key = key
    # A capture replays the copy from `host` every time: both stay alive with the plan.
    plan.offsets[key] = (host, device)
    return device


def _learning_rates(groups: list[dict[str, Any]], device: Any) -> Any:
    """The groups' learning rates as a float32 device tensor: stacked from the groups' device
    tensors where they are some (in a CUDA graph), else copied from the host."""
    import numpy as np
    import torch

    values = [g["lr"] for g in groups]
    if all(torch.is_tensor(v) for v in values):
        return torch.stack([v.to(device=device, dtype=torch.float32).reshape(()) for v in values])
    return _pinned(np.array([float(v) for v in values], dtype=np.float32)).to(
        device, non_blocking=True)


def _pinned(array: Any) -> Any:
    import torch

    t = torch.from_numpy(array)
    return t.pin_memory() if torch.cuda.is_available() else t


def _processors(device: Any) -> int:
    import torch

    if device.type != "cuda":
        return 4  # (the Triton interpreter, in the CPU tests)
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def _compiled() -> Any:
    global _kernel
    if _kernel is not None:
        return _kernel
    import triton
    import triton.language as tl

    @triton.jit
    def adamw_kernel(base, blocks, n_blocks, offsets, lrs, wds, scale_ptr, inf_ptr,
                     beta1, beta2, eps, ITERS: tl.constexpr, BLOCK: tl.constexpr,
                     HAS_SCALE: tl.constexpr,
                     HAS_INF: tl.constexpr):
        if HAS_INF:
            if tl.load(inf_ptr) != 0:
                return
        inv = 1.0
        if HAS_SCALE:
            inv = 1.0 / tl.load(scale_ptr)
        lanes = tl.arange(0, BLOCK)
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        for i in range(0, ITERS):  # (rounds of blocks: fixed for a model, so a constant)
            b = pid + i * programs
            live = b < n_blocks  # the last round has fewer blocks than programs
            b = tl.minimum(b, n_blocks - 1)
            t = tl.load(blocks + 2 * b)
            start = tl.load(blocks + 2 * b + 1)
            row = offsets + 8 * t
            n = tl.where(live, tl.load(row + 5) - start, 0)
            grp = tl.load(row + 6)
            lr = tl.load(lrs + grp)
            wd = tl.load(wds + grp)
            step = tl.load(base + tl.load(row + 4))
            at_p = tl.multiple_of(tl.load(row) + start, 16)
            at_g = tl.multiple_of(tl.load(row + 1) + start, 16)
            at_m = tl.multiple_of(tl.load(row + 2) + start, 16)
            at_v = tl.multiple_of(tl.load(row + 3) + start, 16)
            mask = lanes < n
            p = tl.load(base + at_p + lanes, mask=mask)
            g = tl.load(base + at_g + lanes, mask=mask) * inv
            m = tl.load(base + at_m + lanes, mask=mask)
            v = tl.load(base + at_v + lanes, mask=mask)
            bc1 = 1.0 - tl.exp2(step * tl.log2(beta1))
            bc2 = 1.0 - tl.exp2(step * tl.log2(beta2))
            p = p - lr * wd * p
            m = beta1 * m + (1.0 - beta1) * g
            v = beta2 * v + (1.0 - beta2) * g * g
            p = p - (lr / bc1) * m / (tl.sqrt(v) / tl.sqrt(bc2) + eps)
            tl.store(base + at_p + lanes, p, mask=mask)
            tl.store(base + at_m + lanes, m, mask=mask)
            tl.store(base + at_v + lanes, v, mask=mask)

    _kernel = adamw_kernel
    return _kernel
