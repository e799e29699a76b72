"""Tasks: which transformers AutoModelFor* class loads a model."""

from __future__ import annotations

from transformers import PretrainedConfig

from ttpu.errors import InvalidArgumentError

# task name -> transformers auto class name
TASK_AUTO_CLASSES: dict[str, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "base": "AutoModel",
    "vision": "AutoModelForImageClassification",
    "audio": "AutoModelForAudioClassification",
    "speech-seq2seq": "AutoModelForSpeechSeq2Seq",
}

# architecture class-name suffix -> task, most specific first
_ARCHITECTURE_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
    ("ForMaskedLM", "masked-lm"),
    ("ForSequenceClassification", "sequence-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForImageClassification", "vision"),
    ("ForAudioClassification", "audio"),
    ("ForSpeechSeq2Seq", "speech-seq2seq"),
)


def check_task(task: str) -> str:
    if task not in TASK_AUTO_CLASSES:
        raise InvalidArgumentError(
            f"unknown task {task!r}; valid tasks: {', '.join(TASK_AUTO_CLASSES)}."
        )
    return task


def task_from_config(config: PretrainedConfig, module_class: str | None = None) -> str:
    """The task implied by the module's class name, else by ``config.architectures``."""
    names = [module_class] if module_class else list(config.architectures or ())
    for architecture in names:
        if architecture in _causal_lm_classes():  # BertGenerationDecoder, ... named otherwise
            return "causal-lm"
        for suffix, task in _ARCHITECTURE_SUFFIXES:
            if architecture.endswith(suffix):
                return task
        if architecture.endswith("ForConditionalGeneration"):
            if getattr(config, "is_encoder_decoder", False):
                return "seq2seq-lm"
            return "causal-lm"
    return "base"


def auto_class(task: str) -> type:
    import transformers

    return getattr(transformers, TASK_AUTO_CLASSES[check_task(task)])


def _causal_lm_classes() -> set[str]:
    """The classes transformers' AutoModelForCausalLM builds."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
