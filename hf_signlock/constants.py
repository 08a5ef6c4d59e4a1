"""File names and format versions: every name a run or an export writes, and every version a reader checks.

A format version is bumped whenever old files would be misread by new code; readers refuse versions they do not
know instead of guessing.
"""

# --- formats ----------------------------------------------------------------------------------------------------------
SIGNS_FORMAT_VERSION = 1  # the seeded sign generator (see hf_signlock/signs/generator.py and docs/method.md)
# SignLock checkpoints. 7: each layer's payload stored under its dense weight's own name (`<layer>.weight`);
# 6: a checksum over every field that decides how the bytes decode (`config_checksum`), also
# held by the guard tensor; 5: embeddings and LM head may be targets (`target_embeddings`); 4: XXH3 checksums; 3: compact
# binary layer records (blake2b); 2: JSON records; 1: a tensor per table
EXPORT_FORMAT_VERSION = 7
# 4 and 5 predate the config checksum and load as before; 4 is 5 without target_embeddings
READABLE_EXPORT_FORMATS = (4, 5, 6, 7)
CHECKSUMMED_FORMAT = 6  # from this version the config checksum and the guard holding it are required
PAYLOAD_AS_WEIGHT_FORMAT = 7  # from this version a layer's payload is stored as `<layer>.weight`
FLIP_CODE_VERSION = 1  # the coded flip stream inside each layer's payload
SIGN_PACK_FORMAT_VERSION = 2  # sign packs: a base model's target signs, 1 bit each (base_signs.py). 2: XXH3 checksum
QUANT_METHOD = "signlock"  # `quantization_config.quant_method` in config.json

# SplitMix64 (Steele, Lea & Flood 2014), the counter-based hash behind the seeded signs. Shared by the reference
# implementation (signs/) and the compiled kernels (kernels/), which must agree bit for bit.
SIGN_KEY_DOMAIN = b"hf_signlock/signs/v1\x00"
SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
SPLITMIX_MUL1 = 0xBF58476D1CE4E5B9
SPLITMIX_MUL2 = 0x94D049BB133111EB

# --- files of a training run --------------------------------------------------------------------------------------------
STATS_NAME = "signlock_stats.json"  # flip rate, crossing histogram, settings, data, library versions
STATE_NAME = "signlock_state.safetensors"  # tracking state inside each Trainer checkpoint (for resuming)
INITIAL_MODEL_DIR = "initial"  # the step-0 model, with save_initial_model=True

# --- files of an export -------------------------------------------------------------------------------------------------
BPW_NAME = "bpw.json"  # bits of every target layer and of the whole checkpoint
EVAL_NAME = "eval.json"  # perplexity measured by `hf-signlock evaluate`
TRAINING_STATS_NAME = "training_" + STATS_NAME  # the run's stats, copied beside the export
CARD_NAME = "README.md"  # the model card

# --- a sign pack: a base model's signs, published once for the exports stored against it ------------------------------
SIGN_PACK_NAME = "signlock_signs.safetensors"  # one bit-packed uint8 tensor per target weight, with metadata
