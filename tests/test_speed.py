"""The speed seam: CPU defaults unchanged, and the GPU pieces equal the plain path.

The fast pieces (varlen attention, fused linear cross-entropy) also run on the CPU when asked
(the attention through a per-example sdpa reference), so their plumbing and arithmetic are
checked here against :func:`trainer_core.model.loss.loss_sum`; bench/throughput.py checks the CUDA
kernels themselves on a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer_core.config import load_config
from trainer_core.data.batching import collate_packed
from trainer_core.model.attention import VARLEN_ATTN, register_varlen_attention
from trainer_core.model.fused_loss import fused_linear_cross_entropy_sum, make_loss_fn
from trainer_core.model.loss import linear_cross_entropy_sum
from trainer_core.model.speed import plan_speed


def _examples(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 40, (1,), generator=g))
        ids = torch.randint(0, 1000, (length,), generator=g).tolist()
        cut = max(1, int(0.3 * length))
        out.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return out


def _load(model_dir, attn):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                attn_implementation=attn).train()


def test_cpu_plan_is_the_plain_path():
    plan = plan_speed(load_config(), torch.device("cpu"))
    assert plan.attn_implementation == "sdpa"
    assert plan.loss_fn is None and plan.pad_to_multiple == 1
    model = torch.nn.Linear(2, 2)
    assert plan.prepare(model) is model


def test_switches_validate_and_turn_pieces_on_cpu():
    cfg = load_config(overrides={"environment.fused_loss": "on", "environment.compile": "off"})
    plan = plan_speed(cfg, torch.device("cpu"))
    assert plan.loss_fn is not None and plan.attn_implementation == "sdpa"
    import pytest

    from trainer_core.errors import ConfigError

    with pytest.raises(ConfigError, match="environment.compile"):
        load_config(overrides={"environment.compile": "yes"})


def test_fused_linear_cross_entropy_matches_chunked():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (37,), generator=g)
    ref = linear_cross_entropy_sum(h, w, None, t, chunk=8)
    gh, gw = torch.autograd.grad(ref * 0.37, (h, w))
    out = fused_linear_cross_entropy_sum(h, w, None, t, chunk=8)
    fh, fw = torch.autograd.grad(out * 0.37, (h, w))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fh, gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fw, gw, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(fused_linear_cross_entropy_sum(h, w, None, t, chunk=8), ref)


def test_varlen_and_fused_loss_equal_plain_loss(micro_model_dir, loss_and_grads):
    register_varlen_attention()
    examples = _examples(7)
    batches = [collate_packed(examples[:4]), collate_packed(examples[4:], pad_to_multiple=16)]
    plain = _load(micro_model_dir, "sdpa")
    fast = _load(micro_model_dir, VARLEN_ATTN)
    ref_loss, ref_grads = loss_and_grads(plain, batches)
    loss, grads = loss_and_grads(fast, batches, make_loss_fn(varlen=True, fused=True))
    assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss)
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-4, atol=1e-6)


def test_varlen_attention_without_lengths_falls_back_to_masked_sdpa(micro_model_dir):
    """Generation and padded batches carry no lengths: same outputs as sdpa, masks honoured."""
    register_varlen_attention()
    plain = _load(micro_model_dir, "sdpa").eval()
    fast = _load(micro_model_dir, VARLEN_ATTN).eval()
    ids = torch.randint(0, 1000, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        a = plain(input_ids=ids, attention_mask=mask).logits
        b = fast(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b)


def test_fixed_shape_batches_of_cuda_graphs_give_the_same_loss_and_gradients(
        micro_model_dir, loss_and_grads):
    """What a CUDA graph replays (padded tokens, padded trained indices, empty segments) is the
    same loss and gradients as the packed batch it came from; checked with the CPU reference
    attention here, the CUDA kernels in bench/throughput.py."""
    from trainer_core.model.graphs import (
        SEGMENT_MULTIPLE,
        TOKEN_MULTIPLE,
        TRAINED_MULTIPLE,
        shape_key,
        static_inputs,
    )

    register_varlen_attention()
    examples = _examples(5, seed=3)
    batch = collate_packed(examples, pad_to_multiple=TOKEN_MULTIPLE)  # as the speed plan asks
    model = _load(micro_model_dir, VARLEN_ATTN)
    fn = make_loss_fn(varlen=True, fused=True)
    ref_loss, ref_grads = loss_and_grads(model, [batch], fn)
    n = sum(sum(1 for t in ex["labels"][1:] if t != -100) for ex in examples)
    fixed = static_inputs(batch, 1.0 / n, pin=False)
    assert fixed["input_ids"].shape[1] == TOKEN_MULTIPLE
    assert fixed["trained_index"].shape[0] == TRAINED_MULTIPLE
    assert fixed["cu_seqlens"].shape[0] == SEGMENT_MULTIPLE + 1  # 5 examples + filler, padded
    cu = fixed["cu_seqlens"].tolist()
    longest = max(b - a for a, b in zip(cu[:-1], cu[1:], strict=True))  # incl. the filler
    assert longest >= max(len(ex["input_ids"]) for ex in examples)
    assert fixed["n_trained"] == n and fixed["max_seqlen"] >= longest
    assert fixed["max_seqlen"] == min(TOKEN_MULTIPLE, 1 << max(10, (longest - 1).bit_length()))
    assert int((fixed["trained_targets"] != -100).sum()) == n
    # a graph's key, computed from the batch alone (to know in advance whether it replays)
    assert shape_key(batch) == (fixed["input_ids"].shape[1], fixed["trained_index"].shape[0],
                                fixed["cu_seqlens"].shape[0], fixed["max_seqlen"])
    model.zero_grad()
    loss, count = fn(model, fixed)
    (loss * fixed["scale"]).backward()
    assert count == n
    assert abs(float(loss.detach()) / n - ref_loss) < 1e-5 * abs(ref_loss)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k], rtol=1e-4, atol=1e-6)


def test_cuda_graphs_only_where_they_work():
    from trainer_core.model.graphs import graphs_wanted

    ok = dict(cuda=True, compiled=True, varlen=True, fused=True, packing=True, fp16=False,
              checkpointing=False, processes=1)
    assert graphs_wanted("auto", **ok)
    assert not graphs_wanted("off", **ok)
    for key, value in (("cuda", False), ("varlen", False), ("fused", False),
                       ("packing", False), ("fp16", True), ("checkpointing", True),
                       ("processes", 2)):
        assert not graphs_wanted("auto", **{**ok, key: value}), key
        assert not graphs_wanted("on", **{**ok, key: value}), key
    assert not graphs_wanted("auto", **{**ok, "compiled": False})
    assert graphs_wanted("on", **{**ok, "compiled": False})


def test_clipping_inside_fused_adamw_equals_clip_grad_norm():
    """The CUDA step clips through fused AdamW's grad_scale; the result is clip_grad_norm_'s."""
    import copy

    from trainer_core.train.update import clip_in_optimizer

    torch.manual_seed(0)
    for max_norm in (0.5, None, 1e9):
        ref = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
        new = copy.deepcopy(ref)
        opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
        opt_new = torch.optim.AdamW(new.parameters(), lr=1e-2, fused=True)
        for _ in range(3):
            x = torch.randn(8, 16) * 10
            for m in (ref, new):
                (m(x) ** 2).sum().backward()
            norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm or float("inf"))
            norm_new = clip_in_optimizer(opt_new, max_norm)
            # The same norm up to float32 summation order (one stacked norm vs clip_grad_norm_'s
            # own reduction), and the first clip really clips.
            assert float(norm_new) == pytest.approx(float(norm_ref), rel=1e-6)
            assert float(norm_ref) > 1.0
            assert (opt_new.grad_scale is None) == (max_norm is None)
            opt_ref.step()
            opt_new.step()
            opt_ref.zero_grad()
            opt_new.zero_grad()
        for a, b in zip(ref.parameters(), new.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_guarded_update_equals_clip_and_step_and_skips_non_finite_steps():
    """The CUDA step queues clipping and AdamW before reading the loss: a finite step is
    clip_grad_norm_ + step; a non-finite loss or norm changes no weight and no AdamW state."""
    import copy

    import pytest

    from trainer_core.train.update import guarded_update

    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    new = copy.deepcopy(ref)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    opt_new = torch.optim.AdamW(new.parameters(), lr=1e-2, fused=True)

    def backward(model):
        loss = (model(torch.randn(8, 16, generator=torch.Generator().manual_seed(1)) * 10)
                ** 2).sum()
        loss.backward()
        return loss.detach().double()

    for _ in range(3):
        backward(ref)
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt_ref.step()
        opt_ref.zero_grad()
        total = backward(new)
        loss, norm = guarded_update(opt_new, total, 0.5)
        # (weights differ by float rounding after a step: divide vs multiply by the clip)
        assert loss == float(total) and norm == pytest.approx(float(norm_ref), rel=1e-6)
        assert norm > 0.5
        opt_new.zero_grad()
    for a, b in zip(ref.parameters(), new.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

    def snapshot():
        return ([p.detach().clone() for p in new.parameters()],
                {k: v.clone() for st in opt_new.state.values() for k, v in st.items()
                 if k != "step"} | {"steps": [st["step"].clone() for st in opt_new.state.values()]})

    for broken in ("loss", "grad"):
        before = snapshot()
        total = backward(new)
        if broken == "loss":
            total = total * float("nan")
        else:
            next(new.parameters()).grad[0, 0] = float("inf")
        loss, norm = guarded_update(opt_new, total, 0.5)
        assert not (math.isfinite(loss) and math.isfinite(norm))
        after = snapshot()
        for a, b in zip(before[0], after[0], strict=True):
            assert torch.equal(a, b), broken
        for key in before[1]:
            for a, b in zip(before[1][key] if key == "steps" else [before[1][key]],
                            after[1][key] if key == "steps" else [after[1][key]], strict=True):
                assert torch.equal(a, b), (broken, key)
        opt_new.zero_grad()
    # and the next finite step updates again
    backward(new)
    guarded_update(opt_new, torch.tensor(1.0, dtype=torch.float64), 0.5)
    assert not torch.equal(next(new.parameters()), before[0][0])


def test_update_graph_records_the_same_step_as_the_eager_one(micro_model_dir):
    """What a whole-step CUDA graph records (environment.graph_update): the optimizer's own
    step reading the new gradients through .grad and the learning rate from the graph's input
    tensor. Run eagerly on the CPU it equals backward + guarded_update, leaves .grad, the
    learning rates and `capturable` as they were, and a non-finite step changes nothing."""
    import copy
    from contextlib import nullcontext

    from trainer_core.config import TrainerConfig
    from trainer_core.model.graphs import TOKEN_MULTIPLE, static_inputs
    from trainer_core.train.graph_update import UpdateGraphs
    from trainer_core.train.step import make_optimizer
    from trainer_core.train.update import guarded_update, queue_update

    register_varlen_attention()
    fn = make_loss_fn(varlen=True, fused=True)
    # (embedding rows off: bit-equal to the plain step; they are compared on their own below)
    graphs = UpdateGraphs(fn, nullcontext, embedding_rows=False)
    ref = _load(micro_model_dir, VARLEN_ATTN)
    new = copy.deepcopy(ref)
    cfg = TrainerConfig()
    opt_ref = make_optimizer(ref, cfg, torch.device("cpu"))
    opt_new = make_optimizer(new, cfg, torch.device("cpu"))
    assert len(opt_new.param_groups) == 2 and opt_new.defaults["fused"]

    def static(seed, scale=None):
        examples = _examples(6, seed=seed)
        batch = collate_packed(examples, pad_to_multiple=TOKEN_MULTIPLE)
        n = sum(sum(1 for t in ex["labels"][1:] if t != -100) for ex in examples)
        fixed = static_inputs(batch, scale if scale is not None else 1.0 / n, pin=False)
        return fixed

    for step in range(3):
        # the schedule moves: the graph reads it from its input (float32: exact powers of two)
        lr = (step + 1) * 2.0**-10
        for g in opt_ref.param_groups:
            g["lr"] = lr
        for g in opt_new.param_groups:
            g["lr"] = 0.5  # what the host holds must not matter, only the input tensor
        fixed = static(step)
        loss, _ = fn(ref, fixed)
        scaled = loss * fixed["scale"]
        scaled.backward()
        ref_loss, ref_norm = guarded_update(opt_ref, scaled.detach(), 0.5)
        opt_ref.zero_grad(set_to_none=False)
        fixed["lr"] = torch.tensor([lr, lr], dtype=torch.float32)
        kept = [p.grad for p in new.parameters()]
        values = graphs.record_update(new, opt_new, fixed,
                                      lambda total: queue_update(opt_new, total, 0.5))
        loss_new, norm_new = values.tolist()
        assert abs(loss_new - ref_loss) <= 1e-6 * abs(ref_loss)
        assert abs(norm_new - ref_norm) <= 1e-5 * ref_norm and norm_new > 0.5  # clipped
        assert all(p.grad is k for p, k in zip(new.parameters(), kept, strict=True))
        assert [g["lr"] for g in opt_new.param_groups] == [0.5, 0.5]
        assert not any(g["capturable"] for g in opt_new.param_groups)
        for (name, a), b in zip(ref.named_parameters(), new.parameters(), strict=True):
            assert torch.equal(a, b), name
    steps = [float(st["step"]) for st in opt_new.state.values()]
    assert steps and all(s == 3.0 for s in steps)

    # A step whose loss is not finite (here: an infinite loss scale) changes nothing.
    before = [p.detach().clone() for p in new.parameters()]
    moments = [st["exp_avg"].clone() for st in opt_new.state.values()]
    broken = static(7, scale=float("inf"))
    broken["lr"] = torch.tensor([1e-3, 1e-3], dtype=torch.float32)
    loss_bad, norm_bad = graphs.record_update(
        new, opt_new, broken, lambda total: queue_update(opt_new, total, 0.5)).tolist()
    assert not (math.isfinite(loss_bad) and math.isfinite(norm_bad))
    assert all(torch.equal(a, b) for a, b in zip(before, new.parameters(), strict=True))
    assert all(torch.equal(a, st["exp_avg"])
               for a, st in zip(moments, opt_new.state.values(), strict=True))
    assert all(float(st["step"]) == 3.0 for st in opt_new.state.values())


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_gradient_by_rows_equals_autograds(micro_model_dir, tied):
    """environment.embedding_grad_rows: the input embedding's gradient summed row by row at
    the batch's token ids is autograd's dense one (tied to the output embedding or not), and
    the padding id's row gets none, as nn.Embedding's own backward does."""
    from transformers import AutoModelForCausalLM

    from trainer_core.model.graphs import TOKEN_MULTIPLE, loss_and_gradients, static_inputs

    register_varlen_attention()
    fn = make_loss_fn(varlen=True, fused=True)
    model = AutoModelForCausalLM.from_pretrained(
        micro_model_dir, dtype=torch.float32, attn_implementation=VARLEN_ATTN,
        tie_word_embeddings=tied).train()
    embed = model.get_input_embeddings()
    assert embed.padding_idx is not None
    assert (model.get_output_embeddings().weight is embed.weight) == tied
    examples = _examples(6, seed=4)
    examples[2]["input_ids"][3] = embed.padding_idx  # the padding id inside an example
    batch = collate_packed(examples, pad_to_multiple=TOKEN_MULTIPLE)
    fixed = static_inputs(batch, 0.01, pin=False)
    assert int((fixed["input_ids"] == embed.padding_idx).sum()) == 1
    params = [p for p in model.parameters() if p.requires_grad]

    def scaled_loss(dev):
        return fn(model, dev)[0] * dev["scale"]

    ref_loss, ref = loss_and_gradients(scaled_loss, model, fixed, params, embedding_rows=False)
    loss, got = loss_and_gradients(scaled_loss, model, fixed, params, embedding_rows=True)
    assert float(loss.detach()) == float(ref_loss.detach())
    where = next(i for i, p in enumerate(params) if p is embed.weight)
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9, msg=str(i))
    used = torch.unique(fixed["input_ids"])
    assert float(ref[where][used].abs().sum()) > 0  # the rows really got gradient
    assert float(got[where][embed.padding_idx].abs().max()) == float(
        ref[where][embed.padding_idx].abs().max())  # autograd's rule for the padding id


def test_update_graphs_are_dropped_when_the_optimizer_state_is_replaced():
    """A graph records the addresses of AdamW's state: loading a state dict (resume, the
    daemon's rollback) or another optimizer must not replay it."""
    from contextlib import nullcontext

    from trainer_core.train.graph_update import UpdateGraphs

    graphs = UpdateGraphs(lambda m, b: (None, 0), nullcontext)
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    graphs._check_optimizer(opt)
    graphs.graphs = {(256, 1024, 9, 1024, "update"): object(), (256, 1024, 9, 1024, True): 1}
    graphs._check_optimizer(opt)  # nothing changed
    assert len(graphs.graphs) == 2
    opt.load_state_dict(opt.state_dict())
    assert list(graphs.graphs) == [(256, 1024, 9, 1024, True)]  # only the update graph goes
    graphs.graphs[(512, 1024, 9, 1024, "update")] = object()
    opt.param_groups[0]["weight_decay"] = 0.5  # recorded as a constant: a change drops it
    graphs._check_optimizer(opt)
    assert list(graphs.graphs) == [(256, 1024, 9, 1024, True)]
    graphs.graphs[(512, 1024, 9, 1024, "update")] = object()
    graphs._check_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert list(graphs.graphs) == [(256, 1024, 9, 1024, True)]


def test_attention_kernel_switch():
    """fa2 always resolves; fa4 asked for where it cannot run is a clear error, not a crash."""
    import pytest

    from trainer_core.errors import ConfigError, UserError
    from trainer_core.model.attention import attention_kernel

    assert attention_kernel("fa2") == "fa2"
    assert attention_kernel("auto") == "fa2"  # no Hopper GPU here
    with pytest.raises(UserError, match="environment.attention_kernel: fa4 needs a Hopper GPU"):
        attention_kernel("fa4")
    with pytest.raises(ConfigError, match="environment.attention_kernel"):
        load_config(overrides={"environment.attention_kernel": "fa3"})


def test_cuda_allocator_setting_keeps_the_users(monkeypatch):
    import os

    from trainer_core.model.tuning import tune_cuda_allocator

    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert not tune_cuda_allocator() and "PYTORCH_ALLOC_CONF" not in os.environ
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append)
    assert tune_cuda_allocator()
    assert calls == ["expandable_segments:True"]


def test_fa4_warm_up_process_gets_the_models_attention_shape(tmp_path, monkeypatch):
    """The warm-up compiles FA4 for the loaded model's heads, into the trainer's cache."""
    import json
    import subprocess

    from trainer_core.model import fa4_warmup

    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, **kw: started.append((cmd, kw)) or cmd)
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    (tmp_path / "config.json").write_text(json.dumps(
        {"num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
         "hidden_size": 1024}))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not fa4_warmup.warm_fa4_kernels(tmp_path) and not started  # one process per machine
    monkeypatch.setenv("LOCAL_RANK", "0")
    # What FA4's import leaves before any kernel is compiled: empty folders per kernel kind.
    kinds = tmp_path / "cache" / "fa4" / "source-fingerprint"
    for kind in ("fwd", "bwd", "bwd_pre"):
        (kinds / kind).mkdir(parents=True)
    try:
        assert fa4_warmup.warm_fa4_kernels(tmp_path)
    finally:
        fa4_warmup._warming.clear()
    # the forward and the backward kernels, each compiled by a process of its own
    assert [cmd[-1].split("; ")[1] for cmd, _ in started] == [
        "_run_fa4_once(16, 8, 128, 'fwd')", "_run_fa4_once(16, 8, 128, 'bwd')"]
    for _, kw in started:
        assert kw["env"]["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] == str(tmp_path / "cache" / "fa4")
    assert not fa4_warmup.warm_fa4_kernels(tmp_path / "missing")  # no config: nothing to warm
    (kinds / "fwd" / "0123abcd.o").write_bytes(b"")  # a kernel compiled by an earlier run
    assert not fa4_warmup.warm_fa4_kernels(tmp_path) and len(started) == 2  # warm machine: no wait


def test_mix_order_reduction_switch(monkeypatch):
    import types

    import torch._inductor
    import torch._inductor.config as inductor_config

    from trainer_core.model.tuning import set_mix_order_reduction

    cfg = inductor_config.triton
    for name in ("mix_order_reduction", "mix_order_reduction_non_strict_mode"):
        monkeypatch.setattr(cfg, name, getattr(cfg, name))  # restored after the test
    # auto: fused, in the non-strict mode that adds no size guards (no recompiles)
    assert set_mix_order_reduction("auto") is True
    assert cfg.mix_order_reduction and cfg.mix_order_reduction_non_strict_mode
    assert set_mix_order_reduction("off") is False
    assert not cfg.mix_order_reduction and not cfg.mix_order_reduction_non_strict_mode
    # a torch without the non-strict mode: the strict fusion would guard on lengths, so off
    old = types.SimpleNamespace(mix_order_reduction=True)
    monkeypatch.setattr(torch._inductor, "config", types.SimpleNamespace(triton=old))
    assert set_mix_order_reduction("on") is False and old.mix_order_reduction is False


def test_loss_kernel_switch_picks_the_triton_chunk_kernel_on_cuda_only(monkeypatch):
    from trainer_core.model import fused_loss

    cfg = load_config(overrides={"environment.fused_loss": "on", "environment.compile": "off"})
    assert "loss gradient by a Triton kernel" not in plan_speed(cfg, torch.device("cpu")).notes
    assert fused_loss._ce_kernel("cpu", triton_ce=True) is fused_loss._ce_loss_and_grad
    pytest.importorskip("triton")
    from trainer_core.model.cross_entropy import ce_loss_and_grad_inplace

    assert fused_loss._ce_kernel("cuda", triton_ce=True) is ce_loss_and_grad_inplace
    on = load_config(overrides={"environment.fused_loss": "on", "environment.compile": "off",
                                "environment.triton_cross_entropy": "on"})
    # a CUDA kernel: the CPU keeps the eager formula whatever the switch says
    assert "loss gradient by a Triton kernel" not in plan_speed(on, torch.device("cpu")).notes
