"""Write a small Hugging Face style sharded safetensors set with the `safetensors` package:
OUT_DIR/model-0000K-of-0000N.safetensors and OUT_DIR/model.safetensors.index.json.

usage: make_safetensors_set.py OUT_DIR PARTS
"""
import json
import os
import sys

import numpy as np
from safetensors.numpy import save_file


def main() -> None:
    out_dir, parts = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(7)
    weight_map = {}
    for k in range(parts):
        name = f"model-{k + 1:05d}-of-{parts:05d}.safetensors"
        tensors = {
            f"model.layers.{k}.mlp.up_proj.weight": rng.standard_normal((64, 32), dtype=np.float32),
            f"model.layers.{k}.input_layernorm.weight": np.ones(32, dtype=np.float16),
        }
        save_file(tensors, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({t: name for t in tensors})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f, indent=2)


if __name__ == "__main__":
    main()
