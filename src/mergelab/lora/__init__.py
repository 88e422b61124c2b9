"""LoRA adapters: fold into a base, merge several, extract from a fine-tune (see docs/lora.md).

`kernels` holds the math (pure torch); `source` the `model+adapter` merge source; `ops` the
streamed fold / merge / extract operations behind `mergelab lora ...`.
"""
