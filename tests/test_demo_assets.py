"""The demo's bundled assets: the sample dataset and the tiny Qwen3 model."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from trainer_core import demo

REPO = Path(__file__).resolve().parents[1]
GENERATOR = REPO / "scripts" / "make_sample_data.py"

ARITH = re.compile(r"^(-?\d+) ([+\-×]) (\d+) = (-?\d+)\.$")
UNIT = re.compile(r"^([\d.]+) (km|m|kg|g|h|min) = ([\d.]+) (km|m|kg|g|h|min)\.$")
TEMP = re.compile(r"^(-?\d+) °C = (-?[\d.]+) °F\.$")
FACTORS = {("km", "m"): 1000, ("kg", "g"): 1000, ("h", "min"): 60}


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_sample_data", GENERATOR)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    text = demo.sample_dataset_path().read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def test_sample_file_is_small_and_well_formed(rows: list[dict]) -> None:
    assert demo.sample_dataset_path().stat().st_size < 200_000
    assert 350 <= len(rows) <= 450
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert len(roles) >= 2 and roles == ["user", "assistant"] * (len(roles) // 2)
        assert all(isinstance(m["content"], str) and m["content"] for m in row["messages"])
        assert isinstance(row["metadata"]["task"], str)


def test_sample_answers_are_correct(rows: list[dict]) -> None:
    counts = {"arith": 0, "unit": 0, "temp": 0}
    for row in rows:
        for m in row["messages"]:
            if m["role"] != "assistant":
                continue
            text = m["content"]
            if a := ARITH.match(text):
                x, op, y, r = int(a[1]), a[2], int(a[3]), int(a[4])
                assert {"+": x + y, "-": x - y, "×": x * y}[op] == r, text
                counts["arith"] += 1
            elif u := UNIT.match(text):
                x, fu, y, tu = float(u[1]), u[2], float(u[3]), u[4]
                if (fu, tu) in FACTORS:
                    assert x * FACTORS[fu, tu] == pytest.approx(y), text
                else:
                    assert y * FACTORS[tu, fu] == pytest.approx(x), text
                counts["unit"] += 1
            elif t := TEMP.match(text):
                assert int(t[1]) * 9 / 5 + 32 == pytest.approx(float(t[2])), text
                counts["temp"] += 1
    assert counts["arith"] >= 100 and counts["unit"] >= 40 and counts["temp"] >= 10


def test_sample_file_regenerates_identically() -> None:
    gen = _generator()
    text = gen.render(gen.generate())
    assert text.encode("utf-8") == demo.sample_dataset_path().read_bytes()
    assert gen.render(gen.generate(seed=1)) != text


def test_sample_file_ships_in_package() -> None:
    path = demo.sample_dataset_path()
    assert path.is_file() and path.parent.parent == Path(demo.__file__).resolve().parent


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def _same_weights(a, b) -> bool:
    import torch as t

    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(t.equal(sa[k], sb[k]) for k in sa)


def test_tiny_model_is_deterministic_and_leaves_rng_alone(torch) -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    m0 = demo.build_tiny_model(seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert _same_weights(m0, demo.build_tiny_model(seed=0))
    assert not _same_weights(m0, demo.build_tiny_model(seed=1))


def test_tiny_model_config_matches_qwen3_tokenizer() -> None:
    cfg = demo.tiny_model_config()
    assert cfg.model_type == "qwen3" and cfg.architectures == ["Qwen3ForCausalLM"]
    assert cfg.vocab_size == 151936 and cfg.tie_word_embeddings
    assert (cfg.eos_token_id, cfg.pad_token_id) == (151645, 151643)
    assert cfg.max_position_embeddings >= 512


def test_ensure_tiny_model_writes_loadable_dir(tmp_path: Path, torch) -> None:
    import transformers

    d = demo.ensure_tiny_model(tmp_path, seed=0)
    assert d.parent == tmp_path and d.name.startswith("tiny-qwen3-")
    assert (d / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [d.name]  # no temp dirs left behind
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    assert demo.ensure_tiny_model(tmp_path, seed=0) == d  # cached: not rewritten
    assert (d / "model.safetensors").stat().st_mtime_ns == mtime

    model = transformers.AutoModelForCausalLM.from_pretrained(d, local_files_only=True)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert _same_weights(model, demo.build_tiny_model(seed=0))
    tok = transformers.AutoTokenizer.from_pretrained(d, local_files_only=True)
    assert len(tok) == 151669
    assert tok.convert_tokens_to_ids("<|im_end|>") == model.config.eos_token_id
    assert demo.tiny_model_dir(tmp_path, seed=1) != d


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path))
    assert demo.default_cache_dir() == tmp_path
    assert demo.tiny_model_dir().parent == tmp_path
    monkeypatch.delenv("TRAINER_CACHE")
    assert demo.default_cache_dir() == Path.home() / ".cache" / "trainer"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_tune_cpu_allocator_applies_on_glibc() -> None:
    from trainer_core.model.tuning import tune_cpu_allocator

    # CI and the demo machine are glibc Linux: the engine's CPU speed-up must really apply.
    assert tune_cpu_allocator() is True


def test_demo_hyperparams_are_valid_config_keys() -> None:
    from trainer_core import config

    nested: dict = {}
    for key, value in demo.DEMO_HYPERPARAMS.items():
        section, field = key.split(".")
        nested.setdefault(section, {})[field] = value
    config.from_dict(nested)  # raises on unknown keys, wrong types or bad ranges
