"""``trainer export``."""

from __future__ import annotations

import json

import click


@click.command()
@click.argument("source", type=click.Path())
@click.option("--to", "to", type=click.Choice(["gguf", "hf"]), required=True,
              help="gguf: one file for llama.cpp / Ollama / LM Studio; hf: a clean Hugging Face "
                   "directory (weights, config, tokenizer, chat template; no run bookkeeping).")
@click.option("--type", "gguf_type", type=click.Choice(["f16", "bf16", "q8_0", "f32"]),
              default=None, help="GGUF tensor type of the 2-D weights (default f16).")
@click.option("--dtype", type=click.Choice(["bf16", "f16", "f32"]), default=None,
              help="--to hf: cast the weights (default: as saved).")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="The GGUF file or HF directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def export(source: str, to: str, gguf_type: str | None, dtype: str | None, output: str,
           overwrite: bool, as_json: bool) -> None:
    """Export a run, checkpoint or model directory SOURCE to GGUF or a clean HF directory.

    A run exports its final model (an adapter run's is merged already); a run that never
    finished has none, so export one of its checkpoints. Qwen3 and Llama architectures.
    """
    from trainer_core.export.write import run_export

    summary = run_export(source, to, output, gguf_type=gguf_type, dtype=dtype,
                         overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(summary))
        return
    size = summary["bytes"] / 1e6
    what = summary.get("type") or summary.get("dtype") or "as saved"
    click.echo(f"wrote {summary['output']} ({size:.1f} MB, {what}) from {summary['source']} "
               f"in {summary['seconds']:.1f} s")
