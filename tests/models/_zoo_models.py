"""The model zoo of test_zoo.py: builders by spec and their example inputs.

A spec is ``"tv:<name>"`` (torchvision classification), ``"timm:<name>"`` or ``"hf:<kind>"``
(Hugging Face, built from a tiny config). Models are randomly initialised (no download)
with 10 classes and small inputs where the architecture allows. Imported by the test
and by the child process that reloads saved models, so builders depend on the spec alone.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NUM_CLASSES = 10

#: torchvision models that need other than the default 32×32 input (or extra arguments)
TV_SIZE = {"alexnet": 64, "inception_v3": 80, "maxvit_t": 224}
TV_KWARGS: dict[str, dict[str, Any]] = {
    "vit_b_16": {"image_size": 32}, "vit_b_32": {"image_size": 32}, "vit_l_16": {"image_size": 32},
    "vit_l_32": {"image_size": 32}, "vit_h_14": {"image_size": 28},
    "googlenet": {"init_weights": True}, "inception_v3": {"init_weights": True},
}
TV_SIZE["vit_h_14"] = 28

#: timm models (small variants) and their input sizes
TIMM = {
    "resnet18": 32,
    "resnet50d": 32,
    "resnetv2_50x1_bit": 32,
    "efficientnet_b0": 32,
    "tf_efficientnet_b0": 32,  # Conv2dSame ("same" padding computed per input)
    "mobilenetv3_small_100": 32,
    "convnext_atto": 32,
    "regnetx_002": 32,
    "vit_tiny_patch16_224": 32,
    "deit_tiny_patch16_224": 32,
    "swin_tiny_patch4_window7_224": 224,
}
TIMM_KWARGS: dict[str, dict[str, Any]] = {
    "vit_tiny_patch16_224": {"img_size": 32},
    "deit_tiny_patch16_224": {"img_size": 32},
}

HF = ("bert", "gpt2", "t5", "llama", "vit")
#: constant keyword arguments for export (T5 returns its key/value cache whatever its config says)
FORWARD_KWARGS: dict[str, dict[str, Any]] = {"hf:t5": {"use_cache": False}}
SEQ = 12  # tokens per sequence
VOCAB = 96


def _hf(kind: str) -> nn.Module:
    import transformers as tf

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if kind == "bert":
        return tf.BertModel(tf.BertConfig(vocab_size=VOCAB, max_position_embeddings=32, **small))
    if kind == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                               bos_token_id=0, eos_token_id=0)
        return tf.GPT2LMHeadModel(config)
    if kind == "t5":
        config = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                             decoder_start_token_id=0)
        return tf.T5ForConditionalGeneration(config)
    if kind == "llama":
        config = tf.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=32, num_key_value_heads=2, **small)
        return tf.LlamaForCausalLM(config)
    if kind == "vit":
        config = tf.ViTConfig(image_size=32, patch_size=8, num_channels=3, num_labels=NUM_CLASSES, **small)
        return tf.ViTForImageClassification(config)
    raise ValueError(f"unknown Hugging Face kind {kind!r}")


def build(spec: str) -> nn.Module:
    """The architecture ``spec`` names, randomly initialised (seed fixed), in eval mode."""
    source, _, name = spec.partition(":")
    torch.manual_seed(0)
    if source == "tv":
        import torchvision

        model = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES, **TV_KWARGS.get(name, {}))
    elif source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **TIMM_KWARGS.get(name, {}))
    elif source == "hf":
        model = _hf(name)
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
    else:
        raise ValueError(f"unknown zoo spec {spec!r}")
    return model.eval()


def example_inputs(spec: str) -> Any:
    """Fixed example inputs for ``spec``: an image batch, or a dict of token ids."""
    source, _, name = spec.partition(":")
    gen = torch.Generator().manual_seed(1)
    if source == "hf" and name != "vit":
        ids = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if name == "t5":
            inputs["decoder_input_ids"] = torch.randint(0, VOCAB, (2, SEQ // 2), generator=gen)
        return inputs
    if source == "hf":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=gen)}
    size = TV_SIZE.get(name, 32) if source == "tv" else TIMM.get(name, 32)
    return torch.randn(2, 3, size, size, generator=gen)


def batch_size(inputs: Any) -> int:
    """The batch size of example inputs (a tensor or a dict of them)."""
    first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs
    return int(first.shape[0])


def outputs(result: Any) -> list[torch.Tensor]:
    """Every tensor of a model's output (a tensor, a tuple, or a Hugging Face ModelOutput), in order."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):  # ModelOutput is a dict of its non-None fields
        result = list(result.values())
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in outputs(item)]
    return []


def run(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    """``model``'s output tensors on ``inputs``, without gradients."""
    with torch.no_grad():
        if isinstance(inputs, dict):
            return outputs(model(**inputs))
        return outputs(model(inputs))


def serve() -> None:
    """Child process: for each JSON line ``{"spec", "path", "out"}`` on stdin, build the model,
    ``trp.load`` the file into it, and save its outputs on the example inputs to ``out``."""
    import json
    import sys

    from safetensors.torch import save_file

    import trp

    torch.set_num_threads(1)
    for line in sys.stdin:
        job = json.loads(line)
        try:
            model = trp.load(job["path"], build(job["spec"]))
            result = run(model.eval(), example_inputs(job["spec"]))
            save_file({str(i): t.contiguous() for i, t in enumerate(result)}, job["out"])
            print("ok", flush=True)
        except Exception as err:  # reported to the test, which fails with it
            print(f"error: {type(err).__name__}: {err}".replace("\n", " "), flush=True)


if __name__ == "__main__":
    serve()
