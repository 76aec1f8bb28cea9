"""loramix: LoRA fine-tuning of small causal language models on a mixture of text datasets."""

__version__ = "0.1.0"
