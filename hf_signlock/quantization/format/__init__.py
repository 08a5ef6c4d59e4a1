"""The checkpoint format: what the bytes of a SignLock checkpoint are, independent of any model or codec.

- ``payload``: a layer's one stored byte tensor, the layout of its sections, its key in the file, checksums;
- ``records``: the compact per-layer records in ``config.json``;
- ``varint``: LEB128 varints and a bounds-checked reader (the framing of records and flip streams);
- ``bitpack``: fixed-width codes packed into bytes, LSB first;
- ``flip_coding``: flip positions as Golomb-coded gaps;
- ``guard``: the guard tensor that makes a checkpoint refuse to load without ``import hf_signlock``;
- ``stored``: the safetensors headers, read and checked before any tensor is loaded.

Counting a checkpoint's bits per part (``quantization/bits.py``) builds the model's compressed layers, so it lives
beside them, not here: nothing in this folder imports the rest of ``hf_signlock.quantization``.
"""
