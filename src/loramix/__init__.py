"""loramix: LoRA fine-tuning of small causal language models on a mixture of text datasets.

The Python API (what the `loramix` command does, for notebooks and scripts):

    import loramix
    cfg = loramix.load_config("configs/demo.yaml", ["train.max_steps=20"])
    result = loramix.train(cfg, run_dir="runs/nb")           # .plan, .eval, .metrics, .run_dir, .adapter
    loramix.evaluate("runs/nb")                              # an EvalResult: .overall, .per_source
    loramix.merge("runs/nb", "merged/nb")
    loramix.generate("runs/nb", "Once upon a time", max_new_tokens=20).texts
    loramix.report("runs/nb")

Errors in the input raise `loramix.LoramixError` with the one-line message the CLI prints.
"""

__version__ = "0.1.0"

# name -> the module that defines it: imported on first use, so `import loramix` loads neither torch nor
# transformers.
_API = {
    "Config": "loramix.config", "load_config": "loramix.config",
    "LoramixError": "loramix.errors",
    "EvalResult": "loramix.evaluation",
    "Sampling": "loramix.serve.sampler",
    "TrainResult": "loramix.training",
    "merge": "loramix.merging",
    "train": "loramix.commands", "evaluate": "loramix.commands", "generate": "loramix.commands",
    "report": "loramix.commands", "Completions": "loramix.commands",
}
__all__ = ["Completions", "Config", "EvalResult", "LoramixError", "Sampling", "TrainResult", "__version__", "evaluate", "generate",
           "load_config", "merge", "report", "train"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'loramix' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
