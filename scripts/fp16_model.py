"""Pack an HF BERT folder with fp16 weights (to carry it to a GPU machine), or unpack it to fp32.

    python scripts/fp16_model.py pack SRC DST     # model.safetensors as fp16 (half the bytes)
    python scripts/fp16_model.py unpack SRC DST   # back to fp32 for training

The round trip rounds every weight to fp16 (relative error <= 2**-11); results
of runs made from an unpacked folder are reported as such.
"""

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

KEEP = ("config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def main() -> None:
    mode, src, dst = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    dtype = {"pack": torch.float16, "unpack": torch.float32}[mode]
    dst.mkdir(parents=True, exist_ok=True)
    for name in KEEP:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    tensors = load_file(src / "model.safetensors")
    save_file({k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()},
              dst / "model.safetensors")


if __name__ == "__main__":
    main()
