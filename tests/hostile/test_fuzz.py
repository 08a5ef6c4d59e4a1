"""Fuzzing the decoders a checkpoint's bytes reach, with a fixed seed and a time bound: random and mutated flip
streams (their CRC recomputed, as a forger would, so the decoder's own checks are what is tested), layer record
strings, and whole checkpoints whose records were mutated and sealed again. Every input either decodes to something
well-formed or raises ``CorruptCheckpointError`` (``SignLockError`` for a whole load); nothing else escapes."""

from __future__ import annotations

import base64
import copy
import shutil
import time
import zlib

import numpy as np
import pytest
import torch
from checkpoint_edits import edit_records
from test_quantizer import IDS, SEED, trained_model
from transformers import AutoModelForCausalLM

from hf_signlock import CorruptCheckpointError, SignLockConfig, SignLockError, quantize_model
from hf_signlock.quantization.codecs import make_codec
from hf_signlock.quantization.format.flip_coding import decode_flips, encode_flips
from hf_signlock.quantization.format.records import decode_records

BUDGET_SECONDS = 2.0  # per fuzz loop: bounded, so the suite's time is too
NUMEL = 4096


def _until_budget(rng_seed: int):
    """Yield a fresh numpy generator step until the time budget is spent (at least 50 steps)."""
    rng, started, steps = np.random.default_rng(rng_seed), time.perf_counter(), 0
    while steps < 50 or time.perf_counter() - started < BUDGET_SECONDS:
        yield rng
        steps += 1


def _reseal_crc(blob: bytearray) -> bytes:
    """The flip stream with its trailing CRC32 recomputed over the rest."""
    body = bytes(blob[:-4])
    return body + zlib.crc32(body).to_bytes(4, "little")


def _check_positions(positions: np.ndarray, numel: int) -> None:
    assert positions.dtype == np.int64
    assert np.all(positions[:-1] < positions[1:]) if len(positions) > 1 else True  # sorted, distinct
    assert len(positions) == 0 or (positions[0] >= 0 and positions[-1] < numel)


def test_flip_streams_decode_exactly_or_are_refused():
    tried = refused = 0
    for rng in _until_budget(0):
        positions = np.sort(rng.choice(NUMEL, size=int(rng.integers(1, 200)), replace=False)).astype(np.int64)
        blob = bytearray(encode_flips(positions, NUMEL))
        for _ in range(int(rng.integers(1, 4))):  # a few bytes changed anywhere, then the CRC made to fit
            blob[int(rng.integers(0, len(blob) - 4))] = int(rng.integers(0, 256))
        if rng.random() < 0.2:  # or cut short / grown
            blob = blob[:int(rng.integers(5, len(blob)))] + bytearray(rng.integers(0, 256, 8, dtype=np.uint8))
        tried += 1
        try:
            _check_positions(decode_flips(_reseal_crc(blob), NUMEL), NUMEL)
        except CorruptCheckpointError:
            refused += 1
    assert tried >= 50 and refused > 0


def test_random_bytes_are_never_a_flip_stream_that_crashes():
    for rng in _until_budget(1):
        blob = rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8).tobytes()
        if len(blob) > 4 and rng.random() < 0.5:
            blob = _reseal_crc(bytearray(blob))
        try:
            _check_positions(decode_flips(blob, NUMEL), NUMEL)
        except CorruptCheckpointError:
            pass


@pytest.mark.parametrize("codec", ["vq", "signmag", "lowrank", "scale", "exact"])
def test_record_strings_decode_or_are_refused(codec):
    decoder = make_codec(codec, {})
    for rng in _until_budget(2):
        raw = rng.integers(0, 256, int(rng.integers(0, 80)), dtype=np.uint8).tobytes()
        text = base64.b64encode(raw).decode() if rng.random() < 0.9 else raw.decode("latin-1")
        try:
            records = decode_records(text, decoder)
        except CorruptCheckpointError:
            continue
        for record in records:
            assert isinstance(record["codec_params"], dict) and record["flip_bytes"] >= 0


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "export"
    model = quantize_model(copy.deepcopy(trained_model("llama")), SignLockConfig(seed=SEED, codec="vq",
                                                                               codec_params={"bits": 4, "group": 6}))
    model.save_pretrained(folder)
    return folder


def test_mutated_and_resealed_records_load_or_are_refused(export, tmp_path):
    """A forger's edit of the records (resealed) either raises a typed error or gives finite logits: the checksum
    stops corruption, the decoders' own checks stop what a forger writes from crashing or hanging."""
    outcomes = {"refused": 0, "loaded": 0}
    for step, rng in enumerate(_until_budget(3)):
        if step >= 25:
            break
        folder = tmp_path / f"case-{step}"
        shutil.copytree(export, folder)
        name = f"model.layers.{int(rng.integers(0, 2))}.mlp.up_proj.weight"
        field = str(rng.choice(["bits", "group", "row_scales", "flip_bytes"]))
        value = int(rng.choice([0, 1, 2, 3, 7, 9, 255, 2 ** 31, 2 ** 62]))

        def mutate(records, name=name, field=field, value=value):
            if field == "flip_bytes":
                records[name]["flip_bytes"] = value
            elif field == "row_scales":
                records[name]["codec_params"]["row_scales"] = ["bf16", "layer", "log8"][value % 3]
            else:
                records[name]["codec_params"][field] = value
        try:
            edit_records(folder, mutate)
        except (SignLockError, ValueError, KeyError):  # the forger's own tools refuse the value
            continue
        started = time.perf_counter()
        try:
            logits = AutoModelForCausalLM.from_pretrained(folder)(IDS).logits
            assert torch.isfinite(logits).all()
            outcomes["loaded"] += 1
        except SignLockError:
            outcomes["refused"] += 1
        assert time.perf_counter() - started < 20, (field, value)
    assert outcomes["refused"] > 0
