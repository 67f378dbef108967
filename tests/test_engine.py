"""The training engine: packing equivalence, loss normalisation, runs, resume, failure handling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from trainer_core.cli import cli
from trainer_core.config import resolve
from trainer_core.data.batching import (
    IGNORE,
    collate_packed,
    collate_padded,
    micro_batches,
    plan_steps,
)
from trainer_core.data.chat import encode
from trainer_core.model.loss import loss_sum
from trainer_core.train.recipe import run_training


def _load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                attn_implementation="sdpa").train()


def _examples(rows, tokenizer, n):
    out = []
    for row in rows[:n]:
        enc = encode(row["messages"], tokenizer, "chatml")
        out.append({"input_ids": list(enc.input_ids), "labels": list(enc.labels)})
    return out


def test_packed_equals_unpacked_loss_and_gradients(micro_model_dir, qwen_tokenizer, sample_rows,
                                                   loss_and_grads):
    model = _load(micro_model_dir)
    examples = _examples(sample_rows, qwen_tokenizer, 6)
    packed_loss, packed_grads = loss_and_grads(model, [collate_packed(examples)])
    # one example per micro-batch: no packing, no padding, the same token weighting
    single_loss, single_grads = loss_and_grads(model, [collate_packed([e]) for e in examples])
    padded_loss, padded_grads = loss_and_grads(
        model, [collate_padded(examples, qwen_tokenizer.pad_token_id)])
    assert abs(packed_loss - single_loss) < 1e-5
    assert abs(packed_loss - padded_loss) < 1e-5
    for name in packed_grads:
        assert torch.allclose(packed_grads[name], single_grads[name], atol=1e-5), name
        assert torch.allclose(packed_grads[name], padded_grads[name], atol=1e-5), name


def test_packed_examples_do_not_attend_to_each_other(micro_model_dir, qwen_tokenizer,
                                                     sample_rows):
    """Changing the first packed example must not change the second one's loss."""
    model = _load(micro_model_dir).eval()
    a, b = _examples(sample_rows, qwen_tokenizer, 2)
    other = _examples(sample_rows[5:], qwen_tokenizer, 1)[0]
    with torch.no_grad():
        second_only = float(loss_sum(model, collate_packed([b]))[0])
        with_a = float(loss_sum(model, collate_packed([a, b]))[0]) - float(
            loss_sum(model, collate_packed([a]))[0])
        with_other = float(loss_sum(model, collate_packed([other, b]))[0]) - float(
            loss_sum(model, collate_packed([other]))[0])
    assert abs(with_a - second_only) < 1e-4
    assert abs(with_other - second_only) < 1e-4


def test_targets_never_cross_example_boundaries():
    exs = [{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]},
           {"input_ids": [4, 5], "labels": [IGNORE, 5]}]
    batch = collate_packed(exs)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # the last token of example 1 must not predict the first token of example 2
    assert batch["targets"].tolist() == [[2, 3, IGNORE, 5, IGNORE]]


def test_step_loss_is_normalised_by_all_trained_tokens_of_the_step(micro_model_dir,
                                                                   qwen_tokenizer, sample_rows,
                                                                   loss_and_grads):
    """Splitting a step into micro-batches of unequal size must not change the loss."""
    model = _load(micro_model_dir)
    examples = _examples(sample_rows, qwen_tokenizer, 5)
    whole, _ = loss_and_grads(model, [collate_packed(examples)])
    split, _ = loss_and_grads(model, [collate_packed(examples[:1]), collate_packed(examples[1:])])
    assert abs(whole - split) < 1e-5
    # and differs from the mean of per-micro-batch means (what we must not compute)
    means = []
    for group in (examples[:1], examples[1:]):
        b = collate_packed(group)
        loss, n = loss_sum(model, b)
        means.append(float(loss.detach()) / n)
    assert abs(sum(means) / 2 - whole) > 1e-4


def test_token_budget_packing_keeps_every_example():
    exs = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in (5, 9, 4, 7, 3)]
    batches = micro_batches(exs, packing=True, batch_size=2, token_budget=12, pad_id=0)
    assert sum(b["input_ids"].shape[1] for b in batches) == 28
    assert all(b["input_ids"].shape[1] <= 12 for b in batches)


def test_data_order_is_a_function_of_the_step():
    plan = plan_steps(10, 4, 2.0, None, seed=3, shuffle=True)
    assert plan.total_steps == 5
    first_epoch = [i for s in range(2) for i in plan.step_indices(s)] + plan.step_indices(2)[:2]
    assert sorted(first_epoch) == list(range(10))
    assert plan.step_indices(3) == plan_steps(10, 4, 2.0, None, 3, True).step_indices(3)


# --------------------------------------------------------------------------- whole runs


def _run_args(model_dir, data, out, *extra):
    return ["run", "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(out),
            "--profile", "plain_sft", "--batch-size", "4", "--learning-rate", "0.003",
            "--set", "hyperparams.warmup_steps=2", "--set", "monitoring.num_preview_samples=2",
            "--set", "monitoring.max_new_tokens=8", "--set", "environment.logging_steps=1",
            "--set", "data.validation_split=0.1", "--set", "monitoring.preview_steps=0",
            "--set", "hyperparams.eval_steps=0", *extra]


def test_end_to_end_cli_run_produces_a_loadable_model(micro_model_dir, small_jsonl, tmp_path,
                                                       monkeypatch):
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, _run_args(micro_model_dir, small_jsonl, out,
                                               "--max-steps", "6", "--quiet", "--json"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["state"] == "completed" and summary["steps_done"] == 6
    assert summary["loss_end"] < summary["loss_start"]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "run.json",
                 "metrics.jsonl", "status.json", "trainer_config.json", "previews.jsonl",
                 "trainer.lock.json"):
        assert (out / name).exists(), name
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["state"] == "completed"
    assert manifest["profile"]["name"] == "plain_sft"
    assert manifest["data"]["train"]["rows_kept"] > 0
    assert len(manifest["dataset_sha256"]) == 64
    assert any(p["distribution"] == "trainer-core" for p in manifest["plugins"])
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == 6
    # the saved model loads and generates decodable text
    gen = CliRunner().invoke(cli, ["generate", "--model", str(out), "--prompt", "What is 2 + 2?",
                                   "--max-new-tokens", "5", "--json"])
    assert gen.exit_code == 0, gen.output
    record = json.loads(gen.output.strip().splitlines()[-1])
    assert isinstance(record["output"], str)


def test_dry_run_prints_plan_and_writes_nothing(micro_model_dir, small_jsonl, tmp_path,
                                                monkeypatch):
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, _run_args(micro_model_dir, small_jsonl, out, "--dry-run"))
    assert result.exit_code == 0, result.output
    assert "run plan" in result.output and "steps" in result.output
    assert not out.exists()


def test_locked_fields_checked_against_the_model(micro_model_dir, small_jsonl, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, _run_args(micro_model_dir, small_jsonl, out,
                                               "--set", "locked.vocab_size=32000"))
    assert result.exit_code == 2
    assert "locked.vocab_size=32000" in result.output and "151936" in result.output
    assert not out.exists()


def test_lock_file_blocks_another_model(micro_model_dir, small_jsonl, tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    first = CliRunner().invoke(cli, _run_args(micro_model_dir, small_jsonl, out, "--max-steps",
                                              "1", "--quiet"))
    assert first.exit_code == 0, first.output
    other = tmp_path / "other-model"
    other.mkdir()
    cfg = json.loads((micro_model_dir / "config.json").read_text())
    cfg["max_position_embeddings"] = 512
    (other / "config.json").write_text(json.dumps(cfg))
    second = CliRunner().invoke(cli, _run_args(other, small_jsonl, out, "--max-steps", "1"))
    assert second.exit_code == 2
    assert "max_context_length: 1024 -> 512" in second.output
    assert "--unlock" in second.output


@pytest.mark.parametrize("device_update", ["off", "on"])
def test_nan_loss_stops_without_final_model(micro_model_dir, small_jsonl, tmp_path, monkeypatch,
                                            device_update):
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    # An absurd learning rate blows the weights up after the first update: the loss of a later
    # step is not finite. Step 1 is checkpointed first and must survive untouched. With
    # device_update (the CUDA default) the update is queued before the loss is read.
    result = CliRunner().invoke(cli, _run_args(
        micro_model_dir, small_jsonl, out, "--max-steps", "6", "--save-steps", "1",
        "--learning-rate", "1e30", "--set", "hyperparams.max_grad_norm=null",
        "--set", "hyperparams.warmup_steps=0", "--quiet", "--json",
        "--set", f"environment.device_update={device_update}"))
    assert result.exit_code == 1, result.output
    status = json.loads((out / "status.json").read_text())
    manifest = json.loads((out / "run.json").read_text())
    assert status["state"] == "failed" and manifest["state"] == "failed"
    assert not (out / "model.safetensors").exists()
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    failed_at = manifest["steps_done"] + 1
    assert ckpts and all(int(c.split("-")[1]) < failed_at for c in ckpts)
    # the surviving checkpoints hold finite weights
    from safetensors.torch import load_file

    for c in ckpts:
        weights = load_file(out / "checkpoints" / c / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values())


def test_bfloat16_weights_train_with_the_device_update(micro_model_dir, small_jsonl, tmp_path,
                                                        monkeypatch):
    """model.dtype=bfloat16 (no float32 master weights) with the device update, as on a GPU:
    fused AdamW takes the clip divisor as a float32 tensor whatever the weights' dtype (a
    bfloat16 divisor stopped such runs at their first update on an H100)."""
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    from safetensors.torch import load_file

    out = tmp_path / "run"
    result = CliRunner().invoke(cli, _run_args(
        micro_model_dir, small_jsonl, out, "--max-steps", "3", "--quiet",
        "--set", "model.dtype=bfloat16", "--set", "hyperparams.max_grad_norm=0.05",
        "--set", "environment.device_update=on"))
    assert result.exit_code == 0, result.output
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    norms = [m["grad_norm"] for m in metrics if "grad_norm" in m]
    assert len(norms) == 3 and min(norms) > 0.05  # every step clipped
    before = load_file(micro_model_dir / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert any(not torch.equal(after[k].float(), before[k].float()) for k in after)  # trained


def test_device_update_trains_as_the_host_read_step(micro_model_dir, small_jsonl, tmp_path,
                                                     monkeypatch):
    """environment.device_update (clip + AdamW queued before the loss is read, the CUDA
    default) gives the same run as reading the loss and norm first (on the CPU too)."""
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    from safetensors.torch import load_file

    from trainer_core.train import engine

    calls = []
    real = engine.guarded_update
    monkeypatch.setattr(engine, "guarded_update", lambda *a: calls.append(1) or real(*a))
    runs = {}
    for switch in ("off", "on"):
        calls.clear()
        out = tmp_path / switch
        result = CliRunner().invoke(cli, _run_args(
            micro_model_dir, small_jsonl, out, "--max-steps", "6", "--quiet",
            "--set", "hyperparams.max_grad_norm=0.05",  # small: every step really clips
            "--set", f"environment.device_update={switch}"))
        assert result.exit_code == 0, result.output
        assert len(calls) == (6 if switch == "on" else 0)
        metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[switch] = ([m["loss"] for m in metrics if "loss" in m],
                        [m["grad_norm"] for m in metrics if "grad_norm" in m],
                        load_file(out / "model.safetensors"))
    (loss_a, norm_a, w_a), (loss_b, norm_b, w_b) = runs["off"], runs["on"]
    assert len(loss_a) == 6 and loss_a == pytest.approx(loss_b, rel=1e-5)
    assert min(norm_a) > 0.05 and norm_a == pytest.approx(norm_b, rel=1e-4)
    assert max(float((w_a[k] - w_b[k]).abs().max()) for k in w_a) <= 1e-5
    assert max(float((w_a[k] - load_file(micro_model_dir / "model.safetensors")[k]).abs().max())
               for k in w_a) > 1e-3  # it trained


def _subprocess_run(args, env):
    return subprocess.Popen([sys.executable, "-m", "trainer_core.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted(micro_model_dir, small_jsonl, tmp_path):
    env = {**os.environ, "TRAINER_CACHE": str(tmp_path / "cache")}
    steps = ["--max-steps", "24", "--save-steps", "4", "--quiet",
             "--set", "hyperparams.save_total_limit=null"]
    straight = tmp_path / "straight"
    proc = _subprocess_run(_run_args(micro_model_dir, small_jsonl, straight, *steps), env)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out

    killed = tmp_path / "killed"
    proc = _subprocess_run(_run_args(micro_model_dir, small_jsonl, killed, *steps), env)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step-000004").exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the end"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "model.safetensors").exists()

    resumed = _subprocess_run(_run_args(micro_model_dir, small_jsonl, killed, *steps,
                                        "--resume"), env)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out

    from safetensors.torch import load_file

    a = load_file(straight / "model.safetensors")
    b = load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    # the learning-rate schedule continued rather than restarting
    lrs_a = [json.loads(x)["lr"] for x in (straight / "metrics.jsonl").read_text().splitlines()
             if '"lr"' in x]
    lrs_b = {json.loads(x)["step"]: json.loads(x)["lr"]
             for x in (killed / "metrics.jsonl").read_text().splitlines() if '"lr"' in x}
    assert abs(lrs_b[24] - lrs_a[-1]) < 1e-12


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_marks_interrupted(micro_model_dir, small_jsonl, tmp_path):
    env = {**os.environ, "TRAINER_CACHE": str(tmp_path / "cache")}
    out_dir = tmp_path / "run"
    proc = _subprocess_run(_run_args(micro_model_dir, small_jsonl, out_dir, "--max-steps", "5000",
                                     "--save-steps", "0", "--quiet"), env)
    status = out_dir / "status.json"
    deadline = time.time() + 240
    while True:
        assert proc.poll() is None and time.time() < deadline
        if status.exists():
            try:
                if json.loads(status.read_text()).get("step", 0) >= 2:
                    break
            except json.JSONDecodeError:  # never happens with atomic writes; fail loudly
                raise
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    final = json.loads(status.read_text())
    assert final["state"] == "interrupted"
    ckpts = list((out_dir / "checkpoints").iterdir())
    assert len(ckpts) == 1 and ckpts[0].name == f"step-{final['step']:06d}"
    assert not (out_dir / "model.safetensors").exists()


def test_resume_without_checkpoint_is_a_user_error(micro_model_dir, small_jsonl, tmp_path):
    result = CliRunner().invoke(cli, _run_args(micro_model_dir, small_jsonl, tmp_path / "x",
                                               "--resume"))
    assert result.exit_code == 2
    assert "no checkpoint" in result.output


def test_precedence_reaches_the_engine(micro_model_dir, small_jsonl, tmp_path, monkeypatch):
    """A JSON file's batch size is used when the CLI flag is not given."""
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"hyperparams": {"batch_size": 3, "max_steps": 2}}))
    resolved = resolve(file=cfg_file, cli={"model.path": str(micro_model_dir),
                                           "data.dataset": str(small_jsonl),
                                           "output.output_dir": str(tmp_path / "o")})
    summary = run_training(resolved, dry_run=True, stream=open(os.devnull, "w"))
    assert summary["examples_per_step"] == 3 and summary["steps"] == 2


def test_preview_command_marks_trained_tokens(small_jsonl):
    result = CliRunner().invoke(cli, ["preview", "--profile", "plain_sft", "--dataset",
                                      str(small_jsonl), "-n", "2", "--no-color"])
    assert result.exit_code == 0, result.output
    first = json.loads(small_jsonl.read_text().splitlines()[0])
    answer = first["messages"][-1]["content"]
    # the answer and its end-of-turn token are inside the trained markers; the question is not
    assert f"[[{answer}<|im_end|>]]" in result.output
    assert f"[[{first['messages'][0]['content']}" not in result.output
    assert result.output.count("trained:") == 2


def test_profile_previews_scores_and_generate_follow_the_run(micro_model_dir, small_jsonl,
                                                             tmp_path, monkeypatch):
    """emoji_think previews are scored and logged; `trainer generate` reuses the run's profile."""
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = _run_args(micro_model_dir, small_jsonl, out, "--max-steps", "2", "--quiet")
    args[args.index("plain_sft")] = "emoji_think"
    result = CliRunner().invoke(cli, [*args, "--set", "profile.options.think_min=3",
                                      "--set", "profile.options.think_max=3"])
    assert result.exit_code == 0, result.output
    previews = [json.loads(x) for x in (out / "previews.jsonl").read_text().splitlines()]
    assert len(previews) == 2 and all(p["step"] == 2 for p in previews)
    assert all({"has_think_prefix", "stopped_after_stop"} <= set(p["scores"]) for p in previews)
    # the prompt is the training prompt: the user turn carries the profile's instructions
    assert all("/three/ times" in p["prompt"] for p in previews)
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert "preview/has_think_prefix" in last
    assert json.loads((out / "status.json").read_text())["previews"][0]["scores"]
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["profile"]["options"]["think_min"] == 3
    assert any(p["distribution"] == "trainer-emoji-think" for p in manifest["plugins"])

    gen = CliRunner().invoke(cli, ["generate", "--model", str(out), "--dataset", str(small_jsonl),
                                   "-n", "2", "--max-new-tokens", "4", "--json"])
    assert gen.exit_code == 0, gen.output
    records = [json.loads(x) for x in gen.output.strip().splitlines() if x.startswith("{")]
    assert len(records) == 2
    assert all("/three/ times" in r["prompt"] for r in records)
    assert all("think_matches_instruction" in r["scores"] for r in records)


def test_invalid_rows_error_or_skip_with_counts(micro_model_dir, small_jsonl, tmp_path,
                                                monkeypatch):
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    lines = small_jsonl.read_text().splitlines()
    lines[2] = json.dumps({"messages": [{"role": "bot", "content": "hi"}]})
    lines[5] = "{not json"
    small_jsonl.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    failed = CliRunner().invoke(cli, _run_args(micro_model_dir, small_jsonl, out, "--dry-run"))
    assert failed.exit_code == 2
    assert 'train.jsonl:3: messages[0].role: unknown role "bot"' in failed.output
    assert "train.jsonl:6:" in failed.output
    resolved = resolve(cli={"model.path": str(micro_model_dir), "data.dataset": str(small_jsonl),
                            "output.output_dir": str(out), "data.on_invalid": "skip"})
    summary = run_training(resolved, dry_run=True, stream=open(os.devnull, "w"))
    assert sum(summary["data"]["skipped_invalid"].values()) == 2
    assert summary["data"]["train_rows"] + summary["data"]["validation_rows"] == len(lines) - 2


def test_loaded_model_is_checked_against_the_lock(micro_model_dir):
    from trainer_core.errors import UserError
    from trainer_core.model.loading import check_model_locked

    model = _load(micro_model_dir)
    check_model_locked(model, {"vocab_size": 151936, "model_architecture": "Qwen3ForCausalLM"})
    with pytest.raises(UserError, match="vocab_size: locked 1000, model has 151936"):
        check_model_locked(model, {"vocab_size": 1000, "max_context_length": 1024})


def test_prefetcher_builds_the_next_step_in_a_thread_and_raises_its_errors():
    """`trainer run` collates step k+1 while step k trains; what a step gets is still
    make(step), however the steps are asked for, and a failure surfaces at its own step."""
    import threading

    import pytest

    from trainer_core.train.inputs import Prefetcher

    made: list[tuple[int, str]] = []

    def make(step):
        made.append((step, threading.current_thread().name))
        if step == 3:
            raise ValueError("bad step 3")
        return step * 10

    main = threading.current_thread().name
    with Prefetcher(make, stop=5) as inputs:
        assert inputs.get(0) == 0  # not prepared: built here
        inputs.prepare(1)
        assert inputs.get(1) == 10  # prepared: built in the thread
        inputs.prepare(2)
        assert inputs.get(1) == 10  # another step than the prepared one: built here
        inputs.prepare(3)
        with pytest.raises(ValueError, match="bad step 3"):  # the thread's error, at its get
            inputs.get(3)
        inputs.prepare(5)  # past the end: nothing
        assert inputs.get(4) == 40
    assert made[0] == (0, main)
    assert made[1][0] == 1 and made[1][1].startswith("prefetch")
    assert (1, main) in made and (4, main) in made
    assert any(s == 3 and name.startswith("prefetch") for s, name in made)
    assert max(s for s, _ in made) == 4  # nothing at or past stop
    assert inputs._pool is None  # leaving the block stopped the thread
    with Prefetcher(make, stop=5, ahead=False) as inputs:
        inputs.prepare(0)
        assert [inputs.get(s) for s in (0, 1)] == [0, 10]
    assert all(name == main for _, name in made[-2:])


def test_train_step_says_when_its_work_is_queued(micro_model_dir):
    """`launched` runs once per step, after the step's work is queued and before its loss is
    read, on both update paths: the run's next collation starts there."""
    import functools

    from trainer_core.config import load_config
    from trainer_core.data.batching import count_trained, micro_batches
    from trainer_core.train.step import prepare_training, train_step

    examples = [{"input_ids": list(range(5, 25)), "labels": [-100] * 5 + list(range(10, 25))}
                for _ in range(4)]
    for switch in ("off", "on"):
        cfg = load_config(overrides={"model.path": str(micro_model_dir),
                                     "environment.device_update": switch})
        setup = prepare_training(cfg, micro_model_dir, 2)
        batches = micro_batches(examples, True, 4, 4096, 0, 1)
        calls: list[int] = []
        loss, norm, _ = train_step(setup, batches, count_trained(batches), 1.0,
                                   launched=functools.partial(calls.append, 1))
        assert calls == [1] and loss > 0 and norm > 0, switch


def test_the_loop_reads_a_step_after_launching_the_next_except_where_the_model_is_looked_at(
        micro_model_dir, small_jsonl, tmp_path, monkeypatch):
    """A step left running on the GPU is read once the next one is launched; a step followed
    by an evaluation, a checkpoint, the end or a step that does not run ahead is read before
    anything else is launched. The run is the same as one that reads every step before
    launching the next."""
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    import attrs
    from safetensors.torch import load_file

    from trainer_core.train import recipe

    events: list[tuple[str, int]] = []
    real = recipe.launch_step

    def launch(*args, **kwargs):
        index = sum(1 for kind, _ in events if kind == "launch")
        events.append(("launch", index))
        step = real(*args, **kwargs)
        inner = step.wait

        def wait():
            events.append(("read", index))
            return inner()

        # as a GPU replay would be (on the CPU every step is finished at launch)
        return attrs.evolve(step, wait=wait, running=True)

    monkeypatch.setattr(recipe, "launch_step", launch)
    # the third step runs to its end at launch (as an eager step does): step 2 is read first
    monkeypatch.setattr(recipe, "runs_ahead",
                        lambda *a: sum(kind == "launch" for kind, _ in events) != 2)
    runs = {}
    for mode in ("overlap", "in-order"):
        if mode == "in-order":
            monkeypatch.setattr(recipe, "can_overlap", lambda *a: False)
        events.clear()
        out = tmp_path / mode
        result = CliRunner().invoke(cli, _run_args(
            micro_model_dir, small_jsonl, out, "--max-steps", "9", "--save-steps", "4",
            "--quiet", "--set", "hyperparams.eval_steps=3"))
        assert result.exit_code == 0, result.output
        order = {e: i for i, e in enumerate(events)}
        assert [i for kind, i in events if kind == "read"] == list(range(9))  # once, in order
        looked_at = {3, 4, 6, 8, 9}  # evaluations, the checkpoint, the end (steps done)
        looked_at.add(2)  # (the step before the one that does not run ahead)
        for k in range(8):  # step index k is done = k + 1
            read_first = order[("read", k)] < order[("launch", k + 1)]
            assert read_first if (k + 1 in looked_at or mode == "in-order") else not read_first, k
        metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[mode] = ([m["loss"] for m in metrics if "loss" in m],
                      [m["eval_loss"] for m in metrics if "eval_loss" in m],
                      sorted(p.name for p in (out / "checkpoints").iterdir()),
                      load_file(out / "model.safetensors"))
    (loss_a, eval_a, ckpt_a, w_a), (loss_b, eval_b, ckpt_b, w_b) = runs.values()
    assert len(loss_a) == 9 and loss_a == loss_b and eval_a == eval_b and len(eval_a) == 3
    assert ckpt_a == ckpt_b == ["step-000004", "step-000008"]
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
