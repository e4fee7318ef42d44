#!/usr/bin/env python3
"""A real loader for qsens' compressed-tensors checkpoints: HF transformers + the compressed-tensors
package load the checkpoint `quantize --layout compressed-tensors` wrote of the fixture model, and
their logits are recorded for the Rust test (tests/quantize.rs) to compare with qsens' own
dequantized forward.

Run where Python and the packages are (the GPU machine: torch 2.11 + transformers 5.17, with the
compressed-tensors wheel and its needs carried):

    python3 scripts/check_compressed_tensors.py --checkpoint DIR --sample sample_00.safetensors ... \
        --out tests/data/hf_compressed_tensors.safetensors

Per sample it stores, under `s{k}.`: the logits of columns 0..511 and 151643..151656 at every
position (`logits_cols`, as the fixture's reference files), the log-sum-exp over the whole
vocabulary per position (`logsumexp`) and the loss; and globally the sha256 of the checkpoint's
model.safetensors it loaded, whether every quantized Linear was decompressed to f32 and whether its
forward quantizes inputs. The output is committed as made; nobody edits it.
"""
import argparse
import hashlib
import json
import sys

import torch
from safetensors.torch import load_file, save_file


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--sample", action="append", required=True, help="fixture reference sample (repeatable)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import compressed_tensors
    import transformers
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    torch.set_num_threads(4)
    model = Qwen3VLForConditionalGeneration.from_pretrained(a.checkpoint, dtype=torch.float32).eval()
    config = json.load(open(f"{a.checkpoint}/config.json"))
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors", qc["quant_method"]

    # What the loader did with the FP8 layers.
    fp8 = [n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None]
    dtypes = sorted({str(m.weight.dtype) for n, m in model.named_modules() if n in fp8})
    status = sorted({str(getattr(m, "quantization_status", None)) for n, m in model.named_modules() if n in fp8})
    print(f"transformers {transformers.__version__}, compressed-tensors {compressed_tensors.__version__}, "
          f"torch {torch.__version__}", flush=True)
    print(f"{len(fp8)} modules with a quantization scheme; weight dtypes {dtypes}; status {status}", flush=True)

    sha = hashlib.sha256(open(f"{a.checkpoint}/model.safetensors", "rb").read()).hexdigest()
    cols = torch.cat([torch.arange(0, 512), torch.arange(151643, 151657)])
    out = {"logit_col_ids": cols.clone()}
    for k, path in enumerate(a.sample):
        r = load_file(path)
        pixel_values = (r["pixel_values_u8"].float() - 127.5) / 127.5
        with torch.no_grad():
            o = model(
                input_ids=r["input_ids"],
                attention_mask=r["attention_mask"],
                pixel_values=pixel_values,
                image_grid_thw=r["image_grid_thw"],
                mm_token_type_ids=r["mm_token_type_ids"],
                labels=r["labels"],
            )
        logits = o.logits[0].float()
        out[f"s{k}.logits_cols"] = logits[:, cols].contiguous()
        out[f"s{k}.logsumexp"] = torch.logsumexp(logits, dim=-1).contiguous()
        out[f"s{k}.loss"] = o.loss.detach().reshape(())
        print(f"sample {k} ({path}): L {logits.shape[0]}, loss {o.loss.item():.7f}", flush=True)

    # Does the quantized forward quantize its inputs? Compare one FP8 Linear with and without.
    name = fp8[0]
    module = dict(model.named_modules())[name]
    x = torch.randn(3, module.in_features) * 3.0
    with torch.no_grad():
        y = module(x)
        plain = torch.nn.functional.linear(x, module.weight, module.bias)
    quantizes_inputs = not torch.equal(y, plain)
    print(f"{name}: forward quantizes its input: {quantizes_inputs}", flush=True)
    metadata = {
        "checkpoint_sha256": sha,
        "transformers": transformers.__version__,
        "compressed_tensors": compressed_tensors.__version__,
        "torch": torch.__version__,
        "fp8_modules": str(len(fp8)),
        "weight_dtypes": ",".join(dtypes),
        "quantizes_inputs": str(quantizes_inputs).lower(),
        "samples": ",".join(p.rsplit("/", 1)[-1] for p in a.sample),
    }
    save_file(out, a.out, metadata=metadata)
    print(json.dumps(metadata), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
