"""Issue 27: LoRA, DoRA and QLoRA adapters through peft, on the micro model.

A run trains only the adapter (the base stays bit-identical), its checkpoints hold only the
adapter and the training state, its output is the merged model plus ``adapter/`` that peft
loads, resume is exact, and the user's mistakes are one-line errors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from trainer_core.cli import cli

pytest.importorskip("peft")

RANK = 4


def run_args(model_dir, data, out, *extra):
    return ["run", "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(out),
            "--profile", "plain_sft", "--batch-size", "4", "--learning-rate", "0.01",
            "--max-length", "1024", "--set", "hyperparams.warmup_steps=0",
            "--set", "monitoring.num_preview_samples=0", "--set", "environment.logging_steps=1",
            "--set", "data.validation_split=0", "--set", "hyperparams.eval_steps=0",
            "--set", "model.adapter=lora", "--set", f"adapter.rank={RANK}", "--quiet", *extra]


def invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in x]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, micro_model_dir, sample_rows):
    """8 steps of LoRA on the micro model, a checkpoint every 4 steps."""
    root = tmp_path_factory.mktemp("lora")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sample_rows[:32]), encoding="utf-8")
    out = root / "run"
    result = invoke(run_args(micro_model_dir, data, out, "--max-steps", "8",
                             "--save-steps", "4"))
    assert result.exit_code == 0, result.output
    return out, data


def _models(model_dir: Path, out: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True,
                                                dtype="float32")
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True,
                                                  dtype="float32").eval()
    return adapted, merged


def test_a_lora_run_trains_and_saves_merged_model_and_adapter(lora_run, micro_model_dir):
    import torch
    from safetensors.torch import load_file

    out, _ = lora_run
    loss = losses(out)
    assert len(loss) == 8 and sum(loss[-2:]) < sum(loss[:2]) - 0.05  # it learns
    # peft loads adapter/ as is, and the adapter trained (B starts at zero)
    adapted, merged = _models(micro_model_dir, out)
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 7 and all(float(p.abs().max()) > 0 for p in lora_b)
    # merged and unmerged forward agree
    ids = torch.tensor([[151644, 872, 198, 9707, 11, 1879, 0, 151645, 198, 151644]])
    with torch.no_grad():
        a, b = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
    assert float((a - b).abs().max()) <= 1e-5
    base = load_file(micro_model_dir / "model.safetensors")
    merged_w = load_file(out / "model.safetensors")
    assert merged_w.keys() == base.keys()
    moved = [k for k in base if not torch.equal(base[k], merged_w[k])]
    assert moved and all(k.endswith("proj.weight") for k in moved)  # only adapted layers
    # the output directory is the base's but for the weights (output fidelity)
    assert (json.loads((out / "config.json").read_text())
            == json.loads((micro_model_dir / "config.json").read_text()))
    assert not (out / "adapter_config.json").exists()  # (would make transformers load the base)


def test_checkpoints_hold_only_the_adapter_and_state(lora_run, micro_model_dir):
    out, _ = lora_run
    ckpt = out / "checkpoints" / "step-000004"
    assert not (ckpt / "model.safetensors").exists()
    adapter = ckpt / "adapter" / "adapter_model.safetensors"
    assert adapter.stat().st_size * 20 < (micro_model_dir / "model.safetensors").stat().st_size
    # AdamW's moments of the adapter only (a full model's would be twice the weights)
    state_file = ckpt / "training_state.pt"
    assert state_file.stat().st_size * 20 < (micro_model_dir / "model.safetensors").stat().st_size
    facts = json.loads((ckpt / "run_facts.json").read_text())
    assert facts["adapter"]["kind"] == "lora" and facts["adapter"]["rank"] == RANK


def test_base_weights_stay_bit_identical(micro_model_dir, small_jsonl):
    """Training steps and the merged save change no frozen tensor of the base."""
    import torch
    from safetensors.torch import load_file

    from trainer_core.config import resolve
    from trainer_core.data.batching import count_trained, micro_batches
    from trainer_core.model import adapters
    from trainer_core.train.step import prepare_training, train_step

    cfg = resolve(cli={"model.path": str(micro_model_dir), "model.adapter": "lora",
                       "adapter.rank": RANK, "adapter.use_dora": True,
                       "hyperparams.learning_rate": 0.01}).config
    setup = prepare_training(cfg, micro_model_dir, 5)
    model = setup.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    g = torch.Generator().manual_seed(0)
    ex = [{"input_ids": torch.randint(0, 1000, (40,), generator=g).tolist()} for _ in range(4)]
    for e in ex:
        e["labels"] = [-100] * 10 + e["input_ids"][10:]
    batches = micro_batches(ex, True, 4, 1024, 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(3):
        train_step(setup, batches, count_trained(batches), 1.0)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters()
               if p.requires_grad)
    merged = adapters.merged_state_dict(model)  # (DoRA's merge, from copies)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(frozen[n], p), n
    base = load_file(micro_model_dir / "model.safetensors")
    for n, p in model.get_base_model().named_parameters():
        if not p.requires_grad:
            key = n.replace(".base_layer.", ".")
            assert torch.equal(base[key], p.detach()), n
    # DoRA's merged weights reproduce the adapted forward
    fresh = type(model.get_base_model())(model.get_base_model().config)
    fresh.load_state_dict(merged, strict=False)
    fresh.eval()
    model.eval()
    ids = torch.tensor([ex[0]["input_ids"]])
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = fresh(input_ids=ids).logits
    assert float((a - b).abs().max()) <= 1e-5


def test_resume_after_a_kill_matches_an_uninterrupted_run(micro_model_dir, lora_run, tmp_path):
    """SIGKILL after the step-4 checkpoint, --resume: the same adapter as the straight run."""
    from safetensors.torch import load_file

    straight, data = lora_run
    killed = tmp_path / "killed"
    env = {**os.environ, "TRAINER_CACHE": str(tmp_path / "cache")}
    args = run_args(micro_model_dir, data, killed, "--max-steps", "8", "--save-steps", "4",
                    "--set", "environment.async_checkpoint=off")
    proc = subprocess.Popen([sys.executable, "-m", "trainer_core", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-000004" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the end"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists()
    result = invoke([*args, "--resume"])
    assert result.exit_code == 0, result.output
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert losses(killed)[4:] == pytest.approx(losses(straight)[4:], abs=1e-6)


def test_resume_with_another_adapter_is_refused(micro_model_dir, lora_run, tmp_path):
    import shutil

    straight, data = lora_run
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    for name in ("status.json", "run.json"):  # make it look interrupted after step 4
        record = json.loads((out / name).read_text())
        record["state"] = "interrupted"
        (out / name).write_text(json.dumps(record))
    for f in ("model.safetensors", "config.json"):
        (out / f).unlink()
    shutil.rmtree(out / "adapter")
    line = one_error_line(invoke([*run_args(micro_model_dir, data, out, "--max-steps", "8"),
                                  "--set", "adapter.rank=8", "--resume"]))
    assert f"adapter.rank: {RANK} -> 8" in line and "--allow-changes" not in line
    line = one_error_line(invoke([*run_args(micro_model_dir, data, out, "--max-steps", "8"),
                                  "--set", "model.adapter=none", "--resume"]))
    assert "adapter" in line


def test_dry_run_shows_trainable_parameters_and_a_smaller_memory_estimate(
        micro_model_dir, small_jsonl, tmp_path):
    full = invoke(["run", "--model", micro_model_dir, "--dataset", small_jsonl, "--dry-run",
                   "--output-dir", tmp_path / "a"])
    lora = invoke(run_args(micro_model_dir, small_jsonl, tmp_path / "b", "--dry-run"))
    assert full.exit_code == 0 and lora.exit_code == 0, lora.output
    # one layer: q 16->16, k 16->8, v 16->8, o 16->16, gate/up 16->32, down 32->16
    per_rank = (32 + 24 + 24 + 32 + 48 + 48 + 48)
    assert f"adapter      lora r={RANK}: {per_rank * RANK:,} trainable of " in lora.output

    def memory(text: str) -> float:
        return float(text.split("memory       ~")[1].split(" GB")[0])

    assert memory(lora.output) < memory(full.output)


def test_user_mistakes_are_one_line_errors(micro_model_dir, small_jsonl, tmp_path, monkeypatch):
    line = one_error_line(invoke([*run_args(micro_model_dir, small_jsonl, tmp_path / "a"),
                                  "--set", "model.adapter=qlora"]))
    assert "qlora" in line and "CUDA" in line
    line = one_error_line(invoke([*run_args(micro_model_dir, small_jsonl, tmp_path / "b"),
                                  "--set", 'adapter.target_modules=["q_prj"]']))
    assert "adapter.target_modules: 'q_prj'" in line and "q_proj" in line
    line = one_error_line(invoke([*run_args(micro_model_dir, small_jsonl, tmp_path / "c"),
                                  "--set", 'adapter.modules_to_save=["lm_head"]']))
    assert "adapter.modules_to_save: 'lm_head'" in line
    line = one_error_line(invoke([*run_args(micro_model_dir, small_jsonl, tmp_path / "d"),
                                  "--set", "adapter.rank=0"]))
    assert "adapter.rank: must be > 0" in line
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "peft" else real(name, *a))
    line = one_error_line(invoke(run_args(micro_model_dir, small_jsonl, tmp_path / "e")))
    assert "pip install 'trainer-core[lora]'" in line


def test_speed_pieces_not_measured_with_adapters_are_switched_off_with_one_line():
    import torch

    from trainer_core.config import resolve
    from trainer_core.model.adapters import with_speed_switches

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    lines: list[str] = []
    none = resolve(cli={}).config
    assert with_speed_switches(none, cuda, lines.append) is none
    lora = resolve(cli={"model.adapter": "lora"}).config
    assert with_speed_switches(lora, cpu, lines.append) is lora and not lines
    env = with_speed_switches(lora, cuda, lines.append).environment
    assert (env.cuda_graphs, env.graph_update, env.embedding_grad_rows) == ("off",) * 3
    assert env.compile == "auto" and env.fused_loss == "auto" and env.device_update == "auto"
    assert lines == ["adapters: CUDA graphs off (not measured with lora yet; environment "
                     "settings)"]
    lines.clear()
    qlora = resolve(cli={"model.adapter": "qlora"}).config
    assert with_speed_switches(qlora, cuda, lines.append).environment.compile == "off"
    assert len(lines) == 1 and "compiled decoder blocks" in lines[0]
    lines.clear()
    off = resolve(cli={"model.adapter": "lora", "environment.cuda_graphs": "off"}).config
    assert with_speed_switches(off, cuda, lines.append) is off and not lines


def test_fused_loss_with_a_frozen_head_skips_its_gradient_and_keeps_the_rest():
    import torch

    from trainer_core.model.speed import fused_linear_cross_entropy_sum

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 8, generator=g)
    weight = torch.randn(50, 8, generator=g)
    targets = torch.randint(0, 50, (37,), generator=g)
    grads = []
    for train_head in (True, False):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(train_head)
        loss = fused_linear_cross_entropy_sum(h, w, None, targets, chunk=16)
        loss.backward()
        grads.append((float(loss.detach()), h.grad, w.grad))
    (la, ha, wa), (lb, hb, wb) = grads
    assert la == lb and torch.equal(ha, hb)
    assert wa is not None and wb is None


@pytest.mark.slow
def test_two_ddp_processes_train_a_lora_like_one(micro_model_dir, lora_run, tmp_path):
    """torchrun, gloo: the same losses and adapter as one process."""
    from safetensors.torch import load_file

    _, data = lora_run
    env = {**os.environ, "TRAINER_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    outs = {}
    for nproc in ("1", "2"):
        out = tmp_path / f"n{nproc}"
        extra = ["--max-steps", "4", "--save-steps", "0", "--grad-accum", "2"]
        if nproc == "2":
            extra += ["--nproc", "2"]
        proc = subprocess.run([sys.executable, "-m", "trainer_core",
                               *run_args(micro_model_dir, data, out, *extra)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outs[nproc] = out
    assert losses(outs["1"]) == pytest.approx(losses(outs["2"]), abs=1e-5)
    a = load_file(outs["1"] / "adapter" / "adapter_model.safetensors")
    b = load_file(outs["2"] / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert (outs["2"] / "model.safetensors").exists()


def test_fsdp_with_an_adapter_is_refused_plainly(micro_model_dir):
    from trainer_core.config import resolve
    from trainer_core.errors import UserError
    from trainer_core.model.adapters import wrap

    class Fsdp:
        strategy = "fsdp"

    cfg = resolve(cli={"model.adapter": "lora"}).config
    with pytest.raises(UserError, match="fsdp with model.adapter is not supported"):
        wrap(object(), cfg, Fsdp())
