"""A layer's stored tensors live in one ``payload`` byte tensor: the layout and its typed views."""

import torch

from hf_signlock import SignLockConfig, quantize_model
from hf_signlock.quantization.format.payload import payload_layout
from hf_signlock.quantization.linear import SignLockLinear


def test_layout_puts_wide_elements_first_without_padding():
    specs = {"codes": ((13,), torch.uint8), "codebook": ((5, 3), torch.bfloat16), "scale": ((7,), torch.float32),
             "flips": ((3,), torch.uint8)}
    layout = payload_layout(specs)
    assert list(layout) == ["scale", "codebook", "codes", "flips"]
    end = 0
    for offset, nbytes, dtype, shape in layout.values():
        assert offset == end and offset % dtype.itemsize == 0
        assert nbytes == dtype.itemsize * torch.Size(shape).numel()
        end += nbytes
    assert end == 28 + 30 + 13 + 3  # every byte is a stored bit


def test_views_survive_a_payload_that_starts_unaligned():
    linear = torch.nn.Linear(16, 8, bias=False)
    model = torch.nn.Sequential(linear)
    model.config = type("Config", (), {})()  # quantize_model records its config on model.config
    quantize_model(model, SignLockConfig(seed=0, codec="scale", target_modules=["0"]))
    layer = model[0]
    assert isinstance(layer, SignLockLinear)
    before = {name: t.clone() for name, t in layer.stored_tensors().items()}
    shifted = torch.zeros(layer.payload.numel() + 1, dtype=torch.uint8)
    shifted[1:] = layer.payload
    layer.payload = torch.nn.Parameter(shifted[1:], requires_grad=False)  # as a loader may hand it over: at an odd byte offset
    for name, tensor in layer.stored_tensors().items():
        assert torch.equal(tensor, before[name])
    assert layer.payload.storage_offset() % 8 == 0  # realigned once, so later views need no copy
    layer.verify()
    assert torch.equal(layer.decode_weight(), torch.sign(linear.weight.detach()) * layer.decode_weight().abs())
