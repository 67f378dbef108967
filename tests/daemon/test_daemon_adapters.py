"""`trainer daemon` with a LoRA adapter: two files trained, the merged model published after
each, checkpoints small (issue 27)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from trainer_core.cli import cli
from trainer_core.daemon import storage
from trainer_core.daemon.home import Home

pytest.importorskip("peft")


@pytest.mark.slow
def test_a_daemon_trains_two_files_with_lora_and_publishes_merged_models(
        tmp_path, micro_model_dir, sample_rows, du):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = du.make_home(tmp_path / "home", micro_model_dir,
                        **{"model.adapter": "lora", "adapter.rank": 4,
                           "hyperparams.learning_rate": 0.01,
                           "daemon.keep_checkpoints": 5})
    home = Home(root)
    files = [du.write_jsonl(tmp_path / "src" / f"{n}.jsonl", sample_rows[i:i + 4])
             for n, i in (("a", 0), ("b", 4))]
    result = CliRunner().invoke(cli, ["daemon", "submit", "--home", str(root),
                                      *map(str, files)])
    assert result.exit_code == 0, result.output
    proc = du.start(root)
    try:
        du.wait_for(lambda: du.all_final(root) and len(du.rows(root)) == 2, 240,
                    "both files", proc, root)
        du.wait_for(lambda: du.status(root).get("state") == "idle", 30, "idle", proc, root)
        assert CliRunner().invoke(cli, ["daemon", "stop", "--home", str(root)]).exit_code == 0
        assert proc.wait(60) == 0
    finally:
        du.kill_group(proc)
    rows = du.rows(root)
    assert [r["state"] for r in rows] == ["completed", "completed"], du.tail(root)
    assert rows[0]["step_before"] == 0 and rows[1]["step_before"] == rows[0]["step_after"] == 2
    # every published model is an ordinary merged model directory; the first (step 0: its
    # checkpoint's, the published copy is gone by retention) is the base
    base = du.weights(micro_model_dir)
    first = du.weights(home.checkpoints / "step-000000")
    assert all(torch.equal(base[k], first[k]) for k in base)
    current = home.current.resolve()
    assert current.name == "step-000004"
    assert not (current / "adapter_config.json").exists()
    assert json.loads((current / "config.json").read_text()) == json.loads(
        (micro_model_dir / "config.json").read_text())
    # ... whose weights are the checkpoint's adapter merged into the base
    ckpt = home.checkpoints / "step-000004"
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(micro_model_dir, dtype="float32"),
        ckpt / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(current, dtype="float32").eval()
    ids = torch.tensor([[151644, 872, 198, 9707, 11, 1879, 151645]])
    with torch.no_grad():
        diff = (adapted(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max()
    assert float(diff) <= 1e-5
    moved = [k for k in base if not torch.equal(base[k], du.weights(current)[k])]
    assert moved and all(k.endswith("proj.weight") for k in moved)
    # checkpoints hold the adapter (the published ones the merged model besides)
    assert all((p / "adapter" / "adapter_model.safetensors").is_file()
               for p in storage.checkpoints(home))
