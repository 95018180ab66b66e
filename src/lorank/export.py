"""Export: the recommendation as JSON, a PEFT `adapter_config.json`, and framework snippets."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from peft import LoraConfig

from lorank.decide import Recommendation
from lorank.errors import LorankError
from lorank.report import atomic_write_text


def lora_config(rec: Recommendation, base_model: str | None = None) -> LoraConfig:
    """The PEFT LoraConfig that carries the recommendation (and the scaling rule it used)."""
    return LoraConfig(
        r=rec.rank, lora_alpha=rec.lora_alpha, use_rslora=rec.use_rslora,
        target_modules=list(rec.target_modules), modules_to_save=list(rec.modules_to_save) or None,
        rank_pattern=dict(rec.rank_pattern), alpha_pattern=dict(rec.alpha_pattern),
        lora_dropout=0.0, bias="none", task_type=rec.task_type,
        base_model_name_or_path=base_model,
    )


def ensure_writable(out: Path) -> Path:
    """Create the output directory and prove it is writable before any work is done."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LorankError(f"--out {out}: is a file; expected a directory (new or existing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".lorank-write-test-{os.getpid()}"  # workers may start together
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise LorankError(f"--out {out}: output directory is not writable ({err.strerror})") from None
    return out


def write_outputs(rec: Recommendation, out: Path, base_model: str | None = None) -> dict[str, Path]:
    """Write recommendation.json, adapter_config.json and snippets.md atomically."""
    out = ensure_writable(out)
    paths = {
        "recommendation": out / "recommendation.json",
        "adapter_config": out / "adapter_config.json",
        "snippets": out / "snippets.md",
    }
    atomic_write_text(paths["recommendation"], json.dumps(rec.to_dict(), indent=2, default=str))
    config = lora_config(rec, base_model).to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    atomic_write_text(paths["adapter_config"], json.dumps(config, indent=2, sort_keys=True))
    atomic_write_text(paths["snippets"], snippets(rec))
    return paths


def snippets(rec: Recommendation) -> str:
    """Copy-paste configuration for PEFT, TRL and Axolotl."""
    targets = json.dumps(list(rec.target_modules))
    pattern = json.dumps(rec.rank_pattern) if rec.rank_pattern else "{}"
    return f"""# lorank recommendation: rank {rec.rank}

## PEFT
```python
from peft import LoraConfig, get_peft_model
config = LoraConfig(r={rec.rank}, lora_alpha={rec.lora_alpha:g}, use_rslora={rec.use_rslora},
                    target_modules={targets}, rank_pattern={pattern},
                    task_type="{rec.task_type}")
model = get_peft_model(model, config)
# or: LoraConfig.from_pretrained("path/to/this/folder")
```

## TRL (SFTTrainer)
```python
trainer = SFTTrainer(model=model, train_dataset=ds, peft_config=config, args=SFTConfig(...))
```

## Axolotl (YAML)
```yaml
adapter: lora
lora_r: {rec.rank}
lora_alpha: {rec.lora_alpha:g}
peft_use_rslora: {str(rec.use_rslora).lower()}
lora_target_modules: {targets}
```
"""


def load_recommendation(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))
