"""The CLI's shared pieces: the consoles, plain printing, and the options several commands
declare (one declaration, one name, one default: each the keyword of the API verb it feeds)."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def say(text: str) -> None:
    """One plain line: paths and names are printed as they are, never read as rich markup
    (an output directory named "out[bold]" printed as "out")."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def parse_lrs(text: str) -> float | list[float]:
    """`--lr`: one learning rate, or several for the probe's pilot to choose from."""
    from lorank.util import parse_list

    values = parse_list(text, float, "lr")
    return values[0] if len(values) == 1 else values


MODEL_HELP = ("HF directory, hub id (org/name: downloaded when not cached), .gguf file, or "
              "alias: smollm2-135m, minilm-l6")
DATA_HELP = (".jsonl/.json/.csv/.parquet, a directory of them (train-*/test-* files: splits), "
             "a `save_to_disk` folder, or a `datasets` name")
ModelOpt = typer.Option(..., "--model", "-m", help=MODEL_HELP)
DataOpt = typer.Option(..., "--data", "-d", help=DATA_HELP)
TargetsOpt = typer.Option("all-linear", help="as in `recommend`")
FormatOpt = typer.Option(None, "--format", help="as in `recommend`")
ValDataOpt = typer.Option(None, help="validation data (default: seeded split)")
MaxLengthOpt = typer.Option(512, min=1, help="truncate examples to this many tokens")
CalibOpt = typer.Option(256, help="calibration examples for the gradient spectrum (split "
                        "into halves A and B)")
ProbeMethodOpt = typer.Option("svd", help="svd: one plain adapter read by SVD truncation; "
                              "nested: nested-dropout training (DyLoRA)")
ProbeRankOpt = typer.Option(64, min=1, help="rank the probe trains at; every rank below is "
                            "read")
LrOpt = typer.Option("1e-3", help="learning rate of the probe run; several (2e-3,8e-3): a "
                     "short pilot at the middle rank picks one")
EpochsOpt = typer.Option(None, help="the planned run: passes over the training data (or "
                         "--steps) [3, the Trainer's default]")
StepsOpt = typer.Option(None, min=1, help="the planned run: optimizer steps, instead of --epochs")
SeedOpt = typer.Option(0, help="seed")
DtypeOpt = typer.Option("float32", help="float32, bfloat16, float16, auto")
DeviceOpt = typer.Option("cpu", help="cpu, cuda, cuda:N, auto")
RemoteCodeOpt = typer.Option(False, help="allow the model's own code to run (off by default)")
OfflineOpt = typer.Option(False, help="read hub models and datasets from the local cache only "
                          "(as HF_HUB_OFFLINE=1): never download")
ProgressOpt = typer.Option(True, "--progress/--quiet", help="progress bars (--quiet: none)")

# `inspect --data` and `shrink --data`: the validation loss of a trained adapter, measured with
# recommend's model and data options (same names, same meanings, same validation split)
AdapterArg = typer.Argument(..., help="a PEFT LoRA adapter directory (safetensors)")
AdapterModelOpt = typer.Option(None, "--model", "-m", help=MODEL_HELP + " [the adapter's "
                               "base_model_name_or_path]")
AdapterDataOpt = typer.Option(None, "--data", "-d", help="with it, the validation loss of the "
                              "adapter (as in `recommend`: " + DATA_HELP + ")")
AdapterValDataOpt = typer.Option(None, help="validation data (default: the seeded split "
                                 "`recommend` makes)")
EvalBatchOpt = typer.Option(8, min=1, help="batch size of the evaluation")
SplitSeedOpt = typer.Option(0, help="seed of the validation split (as in `recommend`)")
