"""A run's trained adapter as files that load without clues-fl, and the merged model.

outputs/<run-name>/adapter/ is a peft adapter folder: adapter_config.json (whose
`base_model_name_or_path` is the base model's real folder, or the Hugging Face id given
as model.name), adapter_model.safetensors, the tokenizer and a model card. transformers
and peft load it offline:

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer
    model = AutoPeftModelForCausalLM.from_pretrained("outputs/smoke/adapter")
    tokenizer = AutoTokenizer.from_pretrained("outputs/smoke/adapter")

The merged model, the base with the adapter folded into its weights, as a standard
Hugging Face model folder (config, safetensors, tokenizer) that needs neither peft nor
clues-fl:

    python -m clues_fl.export outputs/smoke --merged merged/
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ADAPTER = "adapter"


class ExportError(ValueError):
    """A folder that is not what the export needs, named with what to do."""


def base_model_path(name: str) -> str:
    """What `base_model_name_or_path` says for `model.name`: the folder the base model
    loads from (the bundled model's and a GGUF's converted copy, a local folder, made
    absolute) or the Hugging Face id as given."""
    from clues_fl.model.loading import resolve_model_path

    resolved = resolve_model_path(name)
    path = Path(resolved).expanduser()
    return str(path.resolve()) if path.exists() else resolved


def save_adapter(model, folder: Path, tokenizer, base: str, adapter_name: str = "default") -> Path:
    """Write `model`'s adapter `adapter_name` (the run's final one) to `folder` as a
    top-level peft adapter (peft puts an adapter other than 'default' in a subfolder;
    here it is always the folder itself), with `base` as its base model and the tokenizer
    beside it. Returns the folder."""
    folder = Path(folder)
    with tempfile.TemporaryDirectory(dir=folder.parent if folder.parent.exists() else None) as tmp:
        model.save_pretrained(tmp, selected_adapters=[adapter_name])
        saved = Path(tmp) / adapter_name if (Path(tmp) / adapter_name / "adapter_config.json").exists() else Path(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for item in saved.iterdir():
            if item.is_file():
                shutil.move(str(item), folder / item.name)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    tokenizer.save_pretrained(str(folder))
    return folder


def adapter_folder(path: Path) -> Path:
    """The adapter folder of a run folder (outputs/<run-name>) or the adapter folder itself."""
    path = Path(path).expanduser()
    for folder in (path / ADAPTER, path):
        if (folder / "adapter_config.json").is_file():
            return folder
    raise ExportError(f"{path}: no adapter_config.json in it or in its '{ADAPTER}' folder: give a finished run's "
                      "folder (outputs/<run-name>) or its adapter folder")


def export_merged(run: Path, out: Path, *, overwrite: bool = False) -> Path:
    """The base model with the run's adapter merged into its weights (peft
    merge_and_unload), saved with its tokenizer as a standard Hugging Face folder."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    adapter = adapter_folder(run)
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out}: exists and is not empty (choose another folder, or --overwrite)")
    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    try:
        model = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    except OSError as err:
        raise ExportError(f"{adapter}: cannot load its base model '{base}' ({' '.join(str(err).split())[:300]})") \
            from err
    merged = model.merge_and_unload()
    merged.config.use_cache = True
    if out.exists():
        shutil.rmtree(out)
    merged.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(adapter)).save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clues_fl.export", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run's folder (outputs/<run-name>) or its adapter folder")
    parser.add_argument("--merged", type=Path, required=True, metavar="FOLDER",
                        help="write the base model with the adapter merged in, as a Hugging Face model folder")
    parser.add_argument("--overwrite", action="store_true", help="replace FOLDER if it is not empty")
    args = parser.parse_args(argv)
    try:
        out = export_merged(args.run, args.merged, overwrite=args.overwrite)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"merged model written to {out} (load it with transformers' AutoModelForCausalLM.from_pretrained)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
