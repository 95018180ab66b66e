"""lorank: which LoRA rank for this model, this dataset, this budget?"""

__version__ = "0.1.0"
