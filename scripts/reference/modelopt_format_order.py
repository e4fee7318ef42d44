#!/usr/bin/env python3
"""Prints the order in which ModelOpt's auto_quantize sorts the formats qsens knows
(`QuantRecipe.__lt__`: effective bits, then the config's JSON signature). The monotone pass over
a layer's scores follows this order, so equal-bit formats (INT8, FP8, ...) must be ordered the
same way. Output: one `NAME effective_bits` line per format; committed as
tests/data/modelopt_format_order.txt. Needs nvidia-modelopt==0.47.0 (and torch) importable.
"""
import warnings

warnings.filterwarnings("ignore")

from modelopt.torch.quantization.algorithms import QuantRecipe  # noqa: E402

NAMES = [
    "FP8_DEFAULT_CFG", "FP8_PER_CHANNEL_PER_TOKEN_CFG", "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG",
    "INT8_DEFAULT_CFG", "INT8_SMOOTHQUANT_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "INT4_AWQ_CFG",
    "W4A8_AWQ_BETA_CFG", "NVFP4_DEFAULT_CFG", "W4A16_NVFP4_CFG", "NVFP4_AWQ_LITE_CFG",
    "MXFP8_DEFAULT_CFG", "MXFP4_DEFAULT_CFG",
]
for recipe in sorted(QuantRecipe(n) for n in NAMES):
    name = str(recipe).split("(")[0]
    print(name, recipe.compression * 16)
