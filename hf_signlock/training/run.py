"""The training job behind ``hf-signlock train``: corpus -> tokenizer -> model -> SignLockTrainer -> HF folder.

Writes to ``output_dir``: the model, its tokenizer and config (a folder ``from_pretrained`` loads), checkpoints,
and ``signlock_stats.json``. The same code runs under ``accelerate launch`` on several processes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, default_data_collator, set_seed
from transformers.utils import logging

from ..cards import training_card
from ..constants import CARD_NAME, STATS_NAME
from ..data import DataArguments, build_lm_datasets, describe_data, load_raw_datasets, train_tokenizer
from ..errors import SignLockConfigError
from .arguments import SignLockTrainingArguments
from .trainer import SignLockTrainer

logger = logging.get_logger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Start from this pretrained model (local folder, '~' expanded, or Hub id); use with "
            "reference_mode='captured'. Unset: build `architecture` from scratch."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to use. Unset: the model's, or one trained on the corpus."}
    )
    architecture: str = field(
        default="llama", metadata={"help": "model_type of a from-scratch model (llama, qwen2, mistral, gpt2, ...)."}
    )
    hidden_size: int = field(default=128, metadata={"help": "From scratch: width of the model."})
    num_hidden_layers: int = field(default=4, metadata={"help": "From scratch: number of transformer blocks."})
    num_attention_heads: int = field(default=4, metadata={"help": "From scratch: attention heads."})
    num_key_value_heads: int | None = field(default=None, metadata={"help": "From scratch: KV heads (GQA)."})
    intermediate_size: int | None = field(default=None, metadata={"help": "From scratch: MLP width."})
    initializer_range: float = field(default=0.02, metadata={"help": "From scratch: init std of the model."})
    tie_word_embeddings: bool = field(
        default=False, metadata={"help": "From scratch: the LM head shares the token embedding's weight."}
    )

    def __post_init__(self):
        # A recipe names a local folder portably as ~/...; from_pretrained would take "~" literally.
        for name in ("model_name_or_path", "tokenizer_name_or_path"):
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("~"):
                setattr(self, name, str(Path(value).expanduser()))



def build_model(model_args: ModelArguments, tokenizer, block_size: int):
    """A pretrained model, or a fresh ``architecture`` sized by ``model_args`` for ``tokenizer``'s vocabulary."""
    if model_args.model_name_or_path is not None:
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    sizes = {
        "hidden_size": model_args.hidden_size,
        "num_hidden_layers": model_args.num_hidden_layers,
        "num_attention_heads": model_args.num_attention_heads,
        "num_key_value_heads": model_args.num_key_value_heads,
        "intermediate_size": model_args.intermediate_size,
    }
    try:
        config = AutoConfig.for_model(
            model_args.architecture,
            **{k: v for k, v in sizes.items() if v is not None},
            initializer_range=model_args.initializer_range,
            tie_word_embeddings=model_args.tie_word_embeddings,
            vocab_size=len(tokenizer),
            max_position_embeddings=block_size,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    except ValueError as error:
        raise SignLockConfigError(f"`architecture`={model_args.architecture!r}: {error}") from None
    if model_args.architecture == "gpt2":
        config.n_positions = block_size  # GPT-2 names its context length differently
    return AutoModelForCausalLM.from_config(config)


def check_run_arguments(training_args: SignLockTrainingArguments) -> None:
    """Refuse a run without ``output_dir``."""
    if training_args.output_dir is None:
        raise SignLockConfigError("`output_dir` is not set. Add `output_dir: runs/<name>` to the recipe.")


def run_training(model_args: ModelArguments, data_args: DataArguments, training_args: SignLockTrainingArguments):
    """Train, evaluate and save; returns the trainer (its stats are in ``output_dir/signlock_stats.json``)."""
    check_run_arguments(training_args)
    raw = load_raw_datasets(data_args)
    tokenizer_source = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    if tokenizer_source is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    else:
        # Deterministic for a given corpus, so every rank of a multi-process run trains the same one.
        tokenizer = train_tokenizer(raw["train"][data_args.text_column], data_args.tokenizer_vocab_size)
    with training_args.main_process_first(desc="tokenising"):
        lm_datasets = build_lm_datasets(raw, tokenizer, data_args)
    set_seed(training_args.seed)  # the non-target weights (embeddings, norms) come from torch's global generator
    model = build_model(model_args, tokenizer, data_args.block_size)
    trainer = SignLockTrainer(
        model=model,
        args=training_args,
        train_dataset=lm_datasets["train"],
        eval_dataset=lm_datasets["validation"],
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    if trainer.is_world_process_zero():  # the data settings, so that exports are evaluated on the same held-out text
        stats_path = Path(training_args.output_dir) / STATS_NAME
        stats = json.loads(stats_path.read_text())
        stats.update(data=dataclasses.asdict(data_args), dataset=describe_data(data_args),
                     model_name_or_path=model_args.model_name_or_path)
        stats_path.write_text(json.dumps(stats, indent=2))
        architecture = type(trainer.model).__name__ if model_args.model_name_or_path else model_args.architecture
        training_card(training_args.output_dir, architecture).save(Path(training_args.output_dir) / CARD_NAME)
    return trainer
