"""The one typed configuration of a training run.

Sources, lowest to highest precedence: the defaults written below, a preset (the embedded demo
sets a few), a JSON file (``--config FILE``), then the CLI (typed flags and ``--set a.b=v``);
``trainer_core.config.sources`` layers them.

Every field is documented where it is defined (``trainer config schema`` prints these docs).
Unknown keys, wrong types and out-of-range values are rejected with their dotted path.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from trainer_core.config.structure import check, one_of, shown, structure, unstructure
from trainer_core.errors import ConfigError

CONFIG_VERSION = 1

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SCHEDULERS = ("cosine", "linear", "constant")
ON_INVALID = ("error", "skip")
DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTN_IMPLS = ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2")
DEVICES = ("auto", "cpu", "cuda")
SWITCHES = ("auto", "on", "off")
CONSTRAIN = ("strict", "soft", "off")
DISTRIBUTED = ("ddp", "fsdp")
#: Row formats of data files (``trainer_core.data.formats`` reads them).
ROW_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion")
#: What ``data.columns`` may rename (which ones a format reads: ``data.formats.DEFAULT_COLUMNS``).
DATA_COLUMNS = ("messages", "role", "content", "system", "prompt", "input", "completion")
DATA_ROLES = ("system", "user", "assistant")
ADAPTERS = ("none", "lora", "qlora")


def doc(text: str | None, **kw: Any) -> dict[str, Any]:
    """Field metadata: the doc string ``trainer config schema`` prints."""
    return {"doc": (text or "").strip(), **kw}


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


def _fraction(v: Any) -> bool:
    return 0 <= v <= 1


def _half_open_fraction(v: Any) -> bool:
    return 0 <= v < 1


#: Seeds feed numpy and torch generators, which take unsigned 32-/64-bit values; bounding them
#: here turns "negative seed" and "1e26" crashes deep in a run into a config error.
MAX_SEED = 2**32 - 1
SPECIAL_TOKEN_POLICIES = ("reject", "allow")
CHANGE_KINDS = ("lr", "schedule", "steps", "batch", "data", "profile", "tokenizer", "template",
                "seed")


def _seed(v: Any) -> bool:
    return 0 <= v <= MAX_SEED


def _change_kinds(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    from trainer_core.config.structure import FieldError

    bad = [v for v in value if v not in CHANGE_KINDS]
    if bad:
        raise FieldError(attribute, f"unknown change kind {shown(bad[0])}; known: "
                                    + ", ".join(CHANGE_KINDS))


@attrs.define(frozen=True)
class HyperParams:
    """Optimisation settings."""

    batch_size: int = attrs.field(
        default=8,
        validator=check(_positive, "must be > 0"),
        metadata=doc(
            "Examples per micro-batch. With packing, the examples of an optimizer step "
            "(batch_size x gradient_accumulation) are packed into micro-batches of at most "
            "data.max_tokens_per_batch tokens."
        ),
    )
    gradient_accumulation: int = attrs.field(
        default=1,
        validator=check(_positive, "must be > 0"),
        metadata=doc("Micro-batches per optimizer step."),
    )
    learning_rate: float = attrs.field(
        default=2e-5, validator=check(_positive, "must be > 0"), metadata=doc("Peak learning rate.")
    )
    lr_scheduler: str = attrs.field(
        default="cosine",
        validator=one_of(*SCHEDULERS),
        metadata=doc("Decay after warmup: cosine (to 10% of peak), linear (to 0) or constant."),
    )
    warmup_steps: int | None = attrs.field(
        default=None,
        validator=check(_non_negative, "must be >= 0"),
        metadata=doc("Linear warmup length in optimizer steps; overrides warmup_ratio."),
    )
    warmup_ratio: float = attrs.field(
        default=0.03,
        validator=check(_fraction, "must be between 0 and 1"),
        metadata=doc("Warmup as a fraction of total steps, used when warmup_steps is not set."),
    )
    num_epochs: float = attrs.field(
        default=1.0,
        validator=check(_positive, "must be > 0"),
        metadata=doc("Passes over the training data (fractions allowed)."),
    )
    max_steps: int | None = attrs.field(
        default=None,
        validator=check(_positive, "must be > 0"),
        metadata=doc("Stop after this many optimizer steps; overrides num_epochs when set."),
    )
    max_length: int = attrs.field(
        default=2048,
        validator=check(_positive, "must be > 0"),
        metadata=doc(
            "Longest example in tokens after templating; longer rows are dropped and counted "
            "(or truncated with data.truncation). Must not exceed the model's "
            "max_position_embeddings; left at its default it is lowered to that."
        ),
    )
    precision: str = attrs.field(
        default="auto",
        validator=one_of(*PRECISIONS),
        metadata=doc("Compute precision: auto (bf16 on a GPU that supports it, else fp32), "
                     "bf16, fp16 or fp32."),
    )
    save_steps: int = attrs.field(
        default=500,
        validator=check(_non_negative, "must be >= 0"),
        metadata=doc("Checkpoint every N optimizer steps (0: no periodic checkpoints). A run "
                     "stopped by Ctrl-C or SIGTERM always writes one, so it can be resumed; a "
                     "completed run has its final model instead."),
    )
    save_total_limit: int | None = attrs.field(
        default=3,
        validator=check(_positive, "must be > 0"),
        metadata=doc("Keep at most this many checkpoints (oldest deleted first); null keeps all."),
    )
    eval_steps: int = attrs.field(
        default=500,
        validator=check(_non_negative, "must be >= 0"),
        metadata=doc("Validation loss every N optimizer steps and at the end (0: only at end)."),
    )
    gradient_checkpointing: bool = attrs.field(
        default=False, metadata=doc("Recompute activations in backward to save memory.")
    )
    checkpointed_layers: int | None = attrs.field(
        default=None,
        validator=check(_non_negative, "must be >= 0"),
        metadata=doc(
            "With gradient_checkpointing: how many decoder layers recompute their activations "
            "(the first N; null: every layer). Each layer left out keeps its activations "
            "(about 10 x hidden + 4 x intermediate values a token) and saves one forward of "
            "itself per micro-batch: use the memory a card has to spare for speed. "
            "--dry-run's memory estimate counts it."
        ),
    )
    weight_decay: float = attrs.field(
        default=0.0,
        validator=check(_non_negative, "must be >= 0"),
        metadata=doc("AdamW decoupled weight decay (not applied to norms and biases)."),
    )
    max_grad_norm: float | None = attrs.field(
        default=1.0,
        validator=check(_positive, "must be > 0"),
        metadata=doc("Clip the global gradient norm to this; null disables clipping."),
    )
    seed: int = attrs.field(
        default=42,
        validator=check(_seed, f"must be between 0 and {MAX_SEED}"),
        metadata=doc("Seed for model init (tiny model), dropout and data order."),
    )


@attrs.define(frozen=True)
class ProfileSection:
    """Which data profile shapes the examples, and its options."""

    name: str = attrs.field(
        default="plain_sft", metadata=doc("Profile name, as listed by `trainer profiles`.")
    )
    options: dict[str, Any] = attrs.field(
        factory=dict,
        metadata=doc("Profile options; validated by the profile (see its README)."),
    )


@attrs.define(frozen=True)
class Monitoring:
    """Live status and generation previews during training."""

    status_interval_s: float = attrs.field(
        default=5.0,
        validator=check(_positive, "must be > 0"),
        metadata=doc("Seconds between status.json updates."),
    )
    preview_steps: int = attrs.field(
        default=200,
        validator=check(_non_negative, "must be >= 0"),
        metadata=doc("Generate previews every N optimizer steps and at the end (0: only at end)."),
    )
    num_preview_samples: int = attrs.field(
        default=4,
        validator=check(_non_negative, "must be >= 0"),
        metadata=doc("Validation prompts per preview (0 disables previews)."),
    )
    max_new_tokens: int | None = attrs.field(
        default=None,
        validator=check(_positive, "must be > 0"),
        metadata=doc("Generation length limit for previews and `trainer generate`. Unset: room "
                     "for the longest reference answer of the prompts (plus a quarter, at least "
                     "16 tokens, at most hyperparams.max_length), so scores that need the end of "
                     "an answer see it; 128 when there is no reference."),
    )
    constrain: str = attrs.field(
        default="strict",
        validator=one_of(*CONSTRAIN),
        metadata=doc("How previews, `trainer generate` and `trainer serve` keep answers in the "
                     "profile's answer format. `strict`: rows whose prompt has a format "
                     "(Profile.answer_format) can only produce text inside it and end the turn "
                     "only where it is complete, the closing forced before max_new_tokens runs "
                     "out (the profile's own logits processors are not used; a profile without "
                     "a format falls back to `soft`). `soft`: the profile's logits processors "
                     "(penalties). `off`: neither."),
    )
    preview_backend: str = attrs.field(
        default="local",
        validator=check(lambda v: v == "local" or v.startswith(("http://", "https://")),
                        "must be local or a server's http(s):// URL"),
        metadata=doc("Where previews are generated: `local` (in the training process) or the "
                     "URL of a running `trainer serve` (e.g. http://127.0.0.1:8765), which "
                     "answers the prompts with the model it serves, its format and its "
                     "processors (API key from $TRAINER_SERVE_API_KEY). Scores are still "
                     "computed here."),
    )
    alerts: bool = attrs.field(
        default=True,
        metadata=doc("Compute alerts during the run: printed once when raised and when cleared, "
                     "kept in status.json (`alerts`), appended to metrics.jsonl and sent to the "
                     "trackers. The thresholds below tune them."),
    )
    stall_after_s: float = attrs.field(
        default=600.0,
        validator=check(_positive, "must be > 0"),
        metadata=doc("Alert `stalled` when no step, evaluation or preview has finished for this "
                     "many seconds. status.json carries `last_event_at` and this value, so a "
                     "reader (`trainer watch`, the dashboard) also sees a run whose process hung "
                     "or died."),
    )
    throughput_drop: float | None = attrs.field(
        default=None,
        validator=check(_fraction, "must be between 0 and 1"),
        metadata=doc("Alert `throughput` when tokens/s (processed tokens, the run's one "
                     "definition; median of the last throughput_window steps) falls below this "
                     "fraction of the run's own baseline (median of the first "
                     "throughput_window steps after warm-up). Steps that include an "
                     "evaluation, preview or checkpoint are left out. 0 disables it. Unset: 0.5 "
                     "on a GPU, off on the CPU, whose speed follows whatever else the machine "
                     "runs (set it to alert there too)."),
    )
    throughput_warmup_steps: int = attrs.field(
        default=10,
        validator=check(_non_negative, "must be >= 0"),
        metadata=doc("Steps ignored before the throughput baseline (compilation, allocator "
                     "warm-up)."),
    )
    throughput_window: int = attrs.field(
        default=10,
        validator=check(_positive, "must be > 0"),
        metadata=doc("Steps in the throughput baseline and in the current rate."),
    )
    loss_window: int = attrs.field(
        default=20,
        validator=check(lambda v: v >= 3, "must be >= 3"),
        metadata=doc("Rolling window (steps) for the loss-spike and gradient-norm alerts; "
                     "neither fires before the window is full."),
    )
    loss_spike_factor: float = attrs.field(
        default=2.0,
        validator=check(lambda v: v > 1, "must be > 1"),
        metadata=doc("Alert `loss_spike` when a step's loss exceeds this many times the median "
                     "of the previous loss_window steps."),
    )
    grad_norm_factor: float = attrs.field(
        default=10.0,
        validator=check(lambda v: v > 1, "must be > 1"),
        metadata=doc("Alert `grad_norm` when a step's gradient norm (before clipping) exceeds "
                     "this many times the median of the previous loss_window steps."),
    )
    val_gap_evals: int = attrs.field(
        default=3,
        validator=check(_positive, "must be > 0"),
        metadata=doc("Alert `val_gap` when the gap between validation loss and training loss "
                     "(median of the last loss_window steps) has grown at this many evaluations "
                     "in a row, exceeds val_gap_min, and the validation loss is higher than "
                     "this many evaluations ago: the model has started to overfit."),
    )
    val_gap_min: float = attrs.field(
        default=0.1,
        validator=check(_non_negative, "must be >= 0"),
        metadata=doc("Smallest validation-minus-training loss gap that can raise `val_gap`."),
    )
    memory_low_fraction: float = attrs.field(
        default=0.3,
        validator=check(_fraction, "must be between 0 and 1"),
        metadata=doc("On CUDA, alert `memory_underused` (info) when the peak memory allocated "
                     "after memory_check_step steps is below this fraction of the GPU's memory: "
                     "a larger batch_size or max_tokens_per_batch would train faster. "
                     "0 disables it."),
    )
    memory_check_step: int = attrs.field(
        default=20,
        validator=check(_positive, "must be > 0"),
        metadata=doc("The step at which GPU memory use is checked once."),
    )
    trackio_project: str = attrs.field(
        default="trainer",
        metadata=doc("Trackio project the run is logged to (with `trackio` in "
                     "environment.report_to); the run is named after its output directory. "
                     "Trackio keeps it in $TRACKIO_DIR/<project>.db (SQLite)."),
    )


@attrs.define(frozen=True)
class Locked:
    """Facts about the base model that an output directory is tied to.

    Left unset, they are filled from the model on the first run and written to the output
    directory's lock file; a later run into that directory must match them.
    """

    base_model: str | None = attrs.field(
        default=None, metadata=doc("Name or path of the base model the run started from.")
    )
    model_architecture: str | None = attrs.field(
        default=None, metadata=doc("Model class, e.g. Qwen3ForCausalLM.")
    )
    max_context_length: int | None = attrs.field(
        default=None,
        validator=check(_positive, "must be > 0"),
        metadata=doc("The model's max_position_embeddings."),
    )
    vocab_size: int | None = attrs.field(
        default=None,
        validator=check(_positive, "must be > 0"),
        metadata=doc("The model's vocabulary size (embedding rows)."),
    )
    model_version: str | None = attrs.field(
        default=None, metadata=doc("Free-form version tag of the base model.")
    )


@attrs.define(frozen=True)
class Data:
    """Training and validation data."""

    dataset: str | None = attrs.field(
        default=None,
        metadata=doc("Training data: a .jsonl, .json (an array), .parquet, .csv or .tsv file, "
                     "or a folder written by datasets' save_to_disk; unset: the bundled sample "
                     "data."),
    )
    validation: str | None = attrs.field(
        default=None, metadata=doc("Validation data (the same kinds as data.dataset); unset: a "
                                   "seeded split of the training data.")
    )
    format: str = attrs.field(
        default="auto",
        validator=one_of(*ROW_FORMATS),
        metadata=doc("Row format: messages (OpenAI chat), prompt_completion, sharegpt "
                     "(conversations of from/value), alpaca (instruction/input/output); auto: "
                     "detected per file from its first valid row."),
    )
    columns: dict[str, str] = attrs.field(
        factory=dict,
        validator=attrs.validators.deep_mapping(
            attrs.validators.in_(DATA_COLUMNS), attrs.validators.instance_of(str)),
        metadata=doc("Column names of the file for the format's columns, e.g. {\"messages\": "
                     "\"dialog\", \"role\": \"speaker\", \"content\": \"text\"}; keys: "
                     + ", ".join(DATA_COLUMNS) + ". Needs data.format."),
    )
    roles: dict[str, str] = attrs.field(
        factory=dict,
        validator=attrs.validators.deep_mapping(
            attrs.validators.instance_of(str), attrs.validators.in_(DATA_ROLES)),
        metadata=doc("Role values of the file -> system, user or assistant, e.g. {\"bot\": "
                     "\"assistant\"} (ShareGPT's human/gpt are known already)."),
    )
    validation_split: float = attrs.field(
        default=0.05,
        validator=check(_half_open_fraction, "must be >= 0 and < 1"),
        metadata=doc("Fraction of training rows held out when no validation file is given."),
    )
    shuffle: bool = attrs.field(default=True, metadata=doc("Shuffle training rows each epoch."))
    seed: int = attrs.field(
        default=42,
        validator=check(_seed, f"must be between 0 and {MAX_SEED}"),
        metadata=doc("Seed for the split, the shuffle and each example's profile transform."),
    )
    packing: bool = attrs.field(
        default=True,
        metadata=doc("Padding-free packing: examples concatenated, attention kept per example."),
    )
    max_tokens_per_batch: int | None = attrs.field(
        default=None,
        validator=check(_positive, "must be > 0"),
        metadata=doc("Token budget of a packed micro-batch; unset: batch_size x max_length."),
    )
    on_invalid: str = attrs.field(
        default="error",
        validator=one_of(*ON_INVALID),
        metadata=doc("Invalid rows: error (stop and report) or skip (drop and count)."),
    )
    truncation: bool = attrs.field(
        default=False,
        metadata=doc("Truncate over-long rows after their last complete assistant turn "
                     "instead of dropping them."),
    )
    cache_dir: str | None = attrs.field(
        default=None,
        metadata=doc("Preprocessing cache; unset: $TRAINER_CACHE or ~/.cache/trainer."),
    )
    special_tokens_in_content: str = attrs.field(
        default="reject",
        validator=one_of(*SPECIAL_TOKEN_POLICIES),
        metadata=doc("Message content containing the tokenizer's special (control) tokens, "
                     "e.g. <|im_end|> or <|im_start|>: reject (an invalid row, handled by "
                     "data.on_invalid) or allow (they become real control tokens, so an answer "
                     "can smuggle a fake turn into training)."),
    )
    max_invalid_fraction: float = attrs.field(
        default=0.5,
        validator=check(_fraction, "must be between 0 and 1"),
        metadata=doc("Stop before training when more than this fraction of the rows was "
                     "dropped (invalid rows skipped, profile rejections, too long, nothing to "
                     "train); 1 never stops."),
    )
    preprocess_workers: int | None = attrs.field(
        default=None,
        validator=check(_positive, "must be > 0"),
        metadata=doc("Processes that preprocess rows on a cache miss (1: in this process); "
                     "unset: one per CPU core, at most 4, when there are >= 1024 rows each."),
    )


@attrs.define(frozen=True)
class Model:
    """The model to fine-tune."""

    path: str | None = attrs.field(
        default=None,
        metadata=doc("Local Hugging Face model directory; unset: the embedded tiny demo model."),
    )
    tokenizer: str | None = attrs.field(
        default=None, metadata=doc("Tokenizer directory; unset: the model directory.")
    )
    dtype: str = attrs.field(
        default="auto",
        validator=one_of(*DTYPES),
        metadata=doc("Weight dtype on load; auto follows hyperparams.precision."),
    )
    attn_implementation: str = attrs.field(
        default="auto",
        validator=one_of(*ATTN_IMPLS),
        metadata=doc("Attention kernel; auto picks the fastest that supports packing here."),
    )
    chat_template: str = attrs.field(
        default="chatml",
        metadata=doc("chatml (plain, no <think> injection), tokenizer (its own template), "
                     "or a path to a Jinja file."),
    )
    trust_remote_code: bool = attrs.field(
        default=False, metadata=doc("Allow model code from the model directory. Off by default.")
    )
    adapter: str = attrs.field(
        default="none",
        validator=one_of(*ADAPTERS),
        metadata=doc("none: full fine-tune. lora: train low-rank adapters (the `adapter` "
                     "section) on a frozen base, through peft (pip install "
                     "'trainer-core[lora]'). qlora: the same on a base quantized to 4-bit NF4 "
                     "by bitsandbytes (CUDA only; pip install 'trainer-core[qlora]'). With an "
                     "adapter, checkpoints hold only the adapter and the training state, and "
                     "the final model is the merged model plus adapter/ (see output.save_merged)."),
    )


@attrs.define(frozen=True)
class Output:
    """Where results go."""

    output_dir: str | None = attrs.field(
        default=None, metadata=doc("Run directory; unset: runs/<profile>-<timestamp>.")
    )
    logging_dir: str | None = attrs.field(
        default=None, metadata=doc("Where metrics.jsonl goes; unset: the output directory.")
    )
    resume: str | None = attrs.field(
        default=None,
        metadata=doc("Resume: 'latest' (newest checkpoint in output_dir; without output_dir "
                     "the newest resumable run of the profile under runs/) or a checkpoint "
                     "path."),
    )
    overwrite: bool = attrs.field(
        default=False,
        metadata=doc("Replace the run output_dir holds (a run directory only: a folder of "
                     "other files, or one holding the data, is refused). Without it a "
                     "non-empty output_dir is refused."),
    )
    allow_changes: list[str] = attrs.field(
        factory=list,
        validator=_change_kinds,
        metadata=doc("On resume, accept these differences from what the checkpoint was trained "
                     "with (the new values are used): " + ", ".join(CHANGE_KINDS) + "."),
    )
    save_merged: bool = attrs.field(
        default=True,
        metadata=doc("With model.adapter: write the final model with the adapter merged into "
                     "the base weights (an ordinary model directory), besides adapter/ (what "
                     "peft.PeftModel.from_pretrained loads). false: adapter/ and the tokenizer "
                     "only (no merge, a small output)."),
    )


@attrs.define(frozen=True)
class Environment:
    """Process-level settings."""

    report_to: list[str] = attrs.field(
        factory=list,
        metadata=doc("Experiment trackers to log to, besides metrics.jsonl (always written): "
                     "tensorboard (event files in <logging_dir or output_dir>/tensorboard; "
                     "pip install 'trainer-core[tensorboard]'), trackio (local SQLite; pip "
                     "install 'trainer-core[trackio]'), or a name a tracker plugin registers "
                     "(`trainer plugins` lists them)."),
    )
    logging_steps: int = attrs.field(
        default=10,
        validator=check(_positive, "must be > 0"),
        metadata=doc("Append a metrics.jsonl line every N optimizer steps."),
    )
    device: str = attrs.field(
        default="auto", validator=one_of(*DEVICES), metadata=doc("auto: cuda if available.")
    )
    compile: str = attrs.field(
        default="auto",
        validator=one_of(*SWITCHES),
        metadata=doc("torch.compile each decoder block in place (one compiled graph shared by "
                     "all layers; fuses norms, RoPE, SwiGLU, residual adds; dynamic sequence "
                     "length). auto: on CUDA, off on CPU. The first steps pay the compile time "
                     "(about a minute). See docs/throughput.md."),
    )
    fused_loss: str = attrs.field(
        default="auto",
        validator=one_of(*SWITCHES),
        metadata=doc("Fused lm_head + cross-entropy over trained positions, chunk by chunk, "
                     "with the gradients computed in the forward pass (no logits recompute, "
                     "no full logits). auto: on CUDA; off uses the chunked checkpointed loss."),
    )
    attention_kernel: str = attrs.field(
        default="auto",
        validator=one_of("auto", "fa2", "fa4"),
        metadata=doc("Kernel behind the varlen attention of packed rows (CUDA only): fa2 is "
                     "PyTorch's own FlashAttention-2; fa4 is FlashAttention-4 (pip install "
                     "'trainer-core[fa4]'; Hopper GPUs; compiled at first use and cached). "
                     "auto: fa4 on a Hopper GPU where it is installed, else fa2. See "
                     "docs/throughput.md."),
    )
    cuda_graphs: str = attrs.field(
        default="auto",
        validator=one_of(*SWITCHES),
        metadata=doc("Replay each packed micro-batch's forward and backward pass from a "
                     "captured CUDA graph (packed rows padded to a multiple of 256 tokens; one "
                     "graph per shape, captured the first time it is seen). Removes the "
                     "kernel-launch overhead that dominates small batches. auto: on CUDA with "
                     "compiled blocks, varlen attention, the fused loss and packing, in a single "
                     "process without fp16 or gradient checkpointing; on: the same without "
                     "requiring compilation. See docs/throughput.md."),
    )
    device_update: str = attrs.field(
        default="auto",
        validator=one_of(*SWITCHES),
        metadata=doc("Clip and update (fused AdamW) on the device before the step's loss and "
                     "gradient norm are read: the host prepares the next step while the GPU "
                     "updates, and a step whose loss or norm is not finite is skipped on the "
                     "device (no weight or optimizer state changes; the run stops as always). "
                     "off: read the loss and norm, then clip and update (the CPU default). "
                     "auto: on CUDA; on: on the CPU too. Needs fused AdamW; off under fp16 and "
                     "torchrun."),
    )
    graph_update: str = attrs.field(
        default="auto",
        validator=one_of(*SWITCHES),
        metadata=doc("A step of one micro-batch (the default batch size on a GPU) is captured "
                     "and replayed whole: forward, backward, gradient norm, clipping and fused "
                     "AdamW in one CUDA graph, the gradients read where the backward pass left "
                     "them instead of copied into .grad. The guard is device_update's: a "
                     "non-finite step changes nothing and stops the run. auto: on where "
                     "cuda_graphs and device_update are both on; off: the graph ends with the "
                     "backward pass and AdamW runs after it."),
    )
    embedding_grad_rows: str = attrs.field(
        default="auto",
        validator=one_of(*SWITCHES),
        metadata=doc("In the CUDA-graph steps, add the input embedding's gradient row by row "
                     "(the batch's token ids) into the table's gradient, instead of autograd's "
                     "dense vocabulary-sized gradient added to the tied output embedding's. "
                     "Same values, summed in another order. auto: on CUDA; off: autograd's "
                     "embedding backward. Only for a plain nn.Embedding."),
    )
    triton_adamw: str = attrs.field(
        default="auto",
        validator=one_of(*SWITCHES),
        metadata=doc("With device_update, take the AdamW step with one persistent Triton "
                     "kernel over every parameter instead of torch's fused AdamW (same "
                     "formula, state and checkpoints; float32 rounding differs). auto: on CUDA "
                     "where Triton is installed and the parameters are float32."),
    )
    triton_cross_entropy: str = attrs.field(
        default="auto",
        validator=one_of(*SWITCHES),
        metadata=doc("With the fused loss, compute each chunk's loss and softmax gradient "
                     "with one Triton kernel that reads the logits twice and writes the "
                     "gradient over them, instead of a compiled function that reads them three "
                     "times into a new buffer (same formula, float32 inside). CUDA only; auto "
                     "and on: where Triton is installed."),
    )
    mix_order_reduction: str = attrs.field(
        default="auto",
        validator=one_of(*SWITCHES),
        metadata=doc("In the compiled decoder blocks, let inductor compute each norm "
                     "backward's two sums (per token for the input gradient, over all tokens "
                     "for the weight gradient) in one pass over the activations instead of "
                     "two, decided once for every sequence length (its non-strict mode), so a "
                     "packed row crossing inductor's size thresholds never recompiles the "
                     "blocks. auto: on where torch has the non-strict mode; off: two passes "
                     "(what runs where it is missing)."),
    )
    async_checkpoint: str = attrs.field(
        default="auto",
        validator=one_of(*SWITCHES),
        metadata=doc("Write checkpoints in a background thread: the loop waits only while "
                     "the weights and optimizer state are copied to host memory, then goes on "
                     "training while the files are written (a checkpoint is announced, and "
                     "counts for resume, once renamed into place; a write error still stops "
                     "the run). auto: on CUDA in a single process; off on CPU and under "
                     "torchrun."),
    )
    distributed: str = attrs.field(
        default="ddp",
        validator=one_of(*DISTRIBUTED),
        metadata=doc("Under torchrun (several processes; `trainer run --nproc N`): ddp keeps a "
                     "full model copy on every GPU and all-reduces gradients; fsdp shards "
                     "weights, gradients and optimizer state across GPUs (FSDP2, fully_shard) "
                     "for models that don't fit one GPU. Ignored in a single process. See "
                     "docs/distributed.md."),
    )


def _names(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    from trainer_core.config.structure import FieldError

    if value is None:
        return
    bad = [v for v in value if not v or not v.replace("_", "").replace(".", "").isalnum()]
    if bad:
        raise FieldError(attribute, f"{bad[0]!r} is not a module name (letters, digits, _ "
                                    "and . only)")


@attrs.define(frozen=True)
class Adapter:
    """Low-rank adapters (model.adapter: lora or qlora): the shape of what is trained."""

    rank: int = attrs.field(
        default=16,
        validator=check(_positive, "must be > 0"),
        metadata=doc("LoRA rank r: each adapted weight W (out x in) gets B (out x r) @ A "
                     "(r x in), trained while W stays frozen."),
    )
    alpha: float = attrs.field(
        default=32.0,
        validator=check(_positive, "must be > 0"),
        metadata=doc("LoRA scaling numerator: the update is (alpha / rank) * B @ A."),
    )
    dropout: float = attrs.field(
        default=0.0,
        validator=check(_half_open_fraction, "must be >= 0 and < 1"),
        metadata=doc("Dropout on the adapter's input during training (0: none, and no extra "
                     "work)."),
    )
    target_modules: list[str] | None = attrs.field(
        default=None,
        validator=_names,
        metadata=doc("Names of the linear layers that get an adapter (e.g. [q_proj, v_proj]; "
                     "a name matches every module ending in it). Unset: every linear layer of "
                     "the decoder blocks (attention and MLP projections; not the lm_head)."),
    )
    use_dora: bool = attrs.field(
        default=False,
        metadata=doc("DoRA: also train a per-output-row magnitude, the direction coming from "
                     "W + B @ A (a little more work per step than plain LoRA)."),
    )
    modules_to_save: list[str] = attrs.field(
        factory=list,
        validator=_names,
        metadata=doc("Modules trained in full besides the adapters, e.g. [embed_tokens, "
                     "lm_head] when the tokenizer gained tokens whose embeddings must be "
                     "learned."),
    )


PRIORITIES = ("high", "normal", "low")
DAEMON_LR_SCHEDULES = ("constant", "per_file")


def _clock_time(v: Any) -> bool:
    parts = str(v).split(":")
    return (len(parts) == 2 and all(p.isdigit() and len(p) == 2 for p in parts)
            and int(parts[0]) < 24 and int(parts[1]) < 60)


@attrs.define(frozen=True)
class Daemon:
    """`trainer daemon`: continuous training on the files dropped in a home's inbox."""

    poll_interval_s: float = attrs.field(
        default=2.0,
        validator=check(_positive, "must be > 0"),
        metadata=doc("Seconds between scans of the inbox (control commands are checked "
                     "more often)."),
    )
    settle_s: float = attrs.field(
        default=5.0,
        validator=check(_non_negative, "must be >= 0"),
        metadata=doc("A file in the inbox is taken only once its size and modification time "
                     "have not changed for this long (files named .* or *.tmp/*.part are "
                     "never taken: write under such a name and rename when done)."),
    )
    default_priority: str = attrs.field(
        default="normal",
        validator=one_of(*PRIORITIES),
        metadata=doc("Priority of files dropped at the top of the inbox (inbox/high/ and "
                     "inbox/low/ set their own)."),
    )
    max_attempts: int = attrs.field(
        default=3,
        validator=check(_positive, "must be > 0"),
        metadata=doc("Attempts per file; a failed attempt requeues the file one priority "
                     "level lower, the last one moves it to failed/."),
    )
    max_row_mb: float = attrs.field(
        default=16.0,
        validator=check(_positive, "must be > 0"),
        metadata=doc("Largest row (line) a file may hold, in MiB: a file with a longer one "
                     "fails at intake, its report naming the line (one huge row would "
                     "otherwise take many GB of worker memory)."),
    )
    epochs_per_file: float = attrs.field(
        default=1.0,
        validator=check(_positive, "must be > 0"),
        metadata=doc("Passes over each file (fractions allowed); replaces "
                     "hyperparams.num_epochs and max_steps in the daemon."),
    )
    lr_schedule: str = attrs.field(
        default="constant",
        validator=one_of(*DAEMON_LR_SCHEDULES),
        metadata=doc("constant: one schedule over the daemon's life, linear warmup over the "
                     "first hyperparams.warmup_steps global steps (0 if unset), then the peak "
                     "learning rate forever. per_file: the same single warmup, then each file "
                     "runs hyperparams.lr_scheduler from the peak over its own steps (the next "
                     "file starts at the peak again)."),
    )
    save_steps: int = attrs.field(
        default=0,
        validator=check(_non_negative, "must be >= 0"),
        metadata=doc("Also checkpoint every N steps inside a file, so a killed daemon resumes "
                     "mid-file (0: only after each file, on pause and on stop)."),
    )
    keep_checkpoints: int = attrs.field(
        default=3,
        validator=check(_positive, "must be > 0"),
        metadata=doc("Newest checkpoints kept in checkpoints/; the one the current model came "
                     "from is never deleted."),
    )
    snapshot_time: str | None = attrs.field(
        default="03:00",
        validator=check(_clock_time, "must be HH:MM (24-hour, local time)"),
        metadata=doc("Local time of the daily snapshot of the current model into "
                     "snapshots/YYYY-MM-DD/; null disables snapshots."),
    )
    snapshot_max_age_h: float = attrs.field(
        default=168.0,
        validator=check(_positive, "must be > 0"),
        metadata=doc("Snapshots older than this many hours are deleted."),
    )
    max_total_gb: float | None = attrs.field(
        default=None,
        validator=check(_positive, "must be > 0"),
        metadata=doc("Size budget of checkpoints/, snapshots/ and models/ together: over it, "
                     "the oldest snapshots, then the oldest checkpoints and published models "
                     "go first (never the current model or its checkpoint); null: no budget."),
    )
    min_free_gb: float = attrs.field(
        default=1.0,
        validator=check(_non_negative, "must be >= 0"),
        metadata=doc("Disk gate: no file is started while the home's file system has less "
                     "free space than this (status.json says so)."),
    )
    status_interval_s: float = attrs.field(
        default=1.0,
        validator=check(_positive, "must be > 0"),
        metadata=doc("Seconds between rewrites of the home's status.json while training."),
    )
    nproc: int = attrs.field(
        default=1,
        validator=check(_positive, "must be > 0"),
        metadata=doc("Training processes on this node, one per GPU: above 1 the daemon "
                     "launches its worker under torchrun, as `trainer run --nproc N` does "
                     "(environment.distributed picks ddp or fsdp; each optimizer step's "
                     "examples are split across the processes). `trainer daemon start "
                     "--nproc N` sets it. See docs/distributed.md."),
    )


SECTIONS = ("hyperparams", "profile", "monitoring", "locked", "data", "model", "output",
            "environment", "daemon", "adapter")


@attrs.define(frozen=True)
class TrainerConfig:
    """A complete, validated run configuration."""

    config_version: int = attrs.field(
        default=CONFIG_VERSION,
        validator=check(lambda v: v == CONFIG_VERSION, f"must be {CONFIG_VERSION}"),
        metadata=doc("Format version of this file (use `trainer config migrate` for old files)."),
    )
    hyperparams: HyperParams = attrs.field(factory=HyperParams, metadata=doc(HyperParams.__doc__))
    profile: ProfileSection = attrs.field(
        factory=ProfileSection, metadata=doc(ProfileSection.__doc__)
    )
    monitoring: Monitoring = attrs.field(factory=Monitoring, metadata=doc(Monitoring.__doc__))
    locked: Locked = attrs.field(factory=Locked, metadata=doc(Locked.__doc__))
    data: Data = attrs.field(factory=Data, metadata=doc(Data.__doc__))
    model: Model = attrs.field(factory=Model, metadata=doc(Model.__doc__))
    output: Output = attrs.field(factory=Output, metadata=doc(Output.__doc__))
    environment: Environment = attrs.field(factory=Environment, metadata=doc(Environment.__doc__))
    daemon: Daemon = attrs.field(factory=Daemon, metadata=doc(Daemon.__doc__))
    adapter: Adapter = attrs.field(factory=Adapter, metadata=doc(Adapter.__doc__))

    def __attrs_post_init__(self) -> None:
        problems = cross_field_problems(self)
        if problems:
            raise ConfigError("; ".join(problems))


def cross_field_problems(cfg: TrainerConfig) -> list[str]:
    """Checks that involve more than one field."""
    hp, locked = cfg.hyperparams, cfg.locked
    out = []
    if locked.max_context_length is not None and hp.max_length > locked.max_context_length:
        out.append(
            f"hyperparams.max_length: must be <= locked.max_context_length "
            f"({locked.max_context_length}), got {hp.max_length}"
        )
    if cfg.data.max_tokens_per_batch is not None and cfg.data.max_tokens_per_batch < hp.max_length:
        out.append(
            f"data.max_tokens_per_batch: must be >= hyperparams.max_length ({hp.max_length}) "
            f"so the longest example fits, got {cfg.data.max_tokens_per_batch}"
        )
    return out


# --------------------------------------------------------------------------- dicts and files


#: Fields that no longer exist, with why. A file that still names one (an old config file, a
#: daemon home's config, a run's trainer_config.json) loads with the key ignored, since its value
#: never changed what training did; ``--set`` of one is still an unknown setting.
RETIRED: dict[str, str] = {
    "environment.dataloader_workers": "never used: the next step's batches are collated on a "
                                      "prefetch thread",
}


def without_retired(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a nested config dict) less the :data:`RETIRED` keys; the input is not changed."""
    out = dict(data)
    for dotted in RETIRED:
        section, _, name = dotted.partition(".")
        if isinstance(out.get(section), dict) and name in out[section]:
            out[section] = {k: v for k, v in out[section].items() if k != name}
    return out


def from_dict(data: dict[str, Any], source: str = "config") -> TrainerConfig:
    """Build a validated config from a (possibly partial) nested dict."""
    try:
        return structure(without_retired(data) if isinstance(data, dict) else data,
                         TrainerConfig, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") if source != "config" else exc from None


def to_dict(cfg: TrainerConfig) -> dict[str, Any]:
    """The full nested dict of ``cfg`` (JSON-serialisable); ``from_dict`` inverts it."""
    return unstructure(cfg)


# --------------------------------------------------------------------------- dotted overrides


def field_paths(cls: type = TrainerConfig, prefix: str = "") -> dict[str, attrs.Attribute]:
    """Every leaf field as ``section.field`` -> attribute (profile.options counts as a leaf)."""
    out: dict[str, attrs.Attribute] = {}
    for a in attrs.fields(cls):
        path = f"{prefix}{a.name}"
        if isinstance(a.type, type) and attrs.has(a.type):
            out.update(field_paths(a.type, path + "."))
        else:
            out[path] = a
    return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{dotted: leaf}``; sections recurse, profile.options entries are leaves."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and (path in SECTIONS or path == "profile.options"):
            if path == "profile.options" and not value:
                out[path] = value
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _resolve_types() -> None:
    # ``from __future__ import annotations`` leaves string types; attrs resolves them here.
    for cls in (HyperParams, ProfileSection, Monitoring, Locked, Data, Model, Output, Environment,
                Daemon, Adapter, TrainerConfig):
        attrs.resolve_types(cls)


_resolve_types()


def config_hash(cfg: TrainerConfig) -> str:
    """A short stable hash of the whole config (for manifests)."""
    import hashlib

    blob = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def schema() -> list[dict[str, Any]]:
    """Every field: dotted path, type, default and doc (for ``trainer config schema``)."""
    out = []
    defaults = flatten(to_dict(TrainerConfig()))
    for path, a in field_paths().items():
        tname = getattr(a.type, "__name__", None) or str(a.type).replace("typing.", "")
        out.append({"field": path, "type": tname, "default": defaults.get(path),
                    "doc": a.metadata.get("doc", "")})
    return out
