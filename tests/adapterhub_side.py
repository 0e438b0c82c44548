"""Runs in the side environment (adapters 1.3 + transformers 4.57 from .venv-adapters, torch from .venv): load
each exported `adapterhub/` dir the way a user of the `adapters` library would, and write its logits.

    PYTHONPATH=.venv-adapters .venv/bin/python tests/adapterhub_side.py JOBS.json

JOBS.json is a list of {"base", "adapter", "inputs", "out"}: a saved HF model dir, the export's adapterhub dir,
a safetensors file of model inputs, and where to write {"logits"}. Prints one JSON object per job (the
adapter name, versions, what the loader reported missing or unexpected), so the test can check that every
tensor found its place. Not a test module itself: it must not import autopeft (transformers 5 code).
"""

from __future__ import annotations

import json
import sys


def run(job: dict) -> dict:
    import adapters
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(job["base"])
    adapters.init(model)
    info: dict = {}
    name = model.load_adapter(job["adapter"], use_safetensors=True, loading_info=info)
    model.set_active_adapters(name)
    model.eval()
    inputs = load_file(job["inputs"])
    with torch.no_grad():
        logits = model(**inputs).logits
    save_file({"logits": logits.float().contiguous()}, job["out"])
    return {"name": name, "adapters": adapters.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__, "missing": sorted(info.get("missing_keys", [])),
            "unexpected": sorted(info.get("unexpected_keys", []))}


def main(argv: list[str]) -> int:
    with open(argv[1], encoding="utf-8") as f:
        jobs = json.load(f)
    print(json.dumps([run(job) for job in jobs]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
