"""The FL-MRG record schema: one row per study, one parquet dataset per center.

Every source (the phantom benchmark, the importers) writes exactly this schema, and every
reader (Ray Data streams, validation) checks it. Documented in docs/data.md.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

# The 14 CheXpert observations, in the fixed order of the `labels` column.
OBSERVATIONS: tuple[str, ...] = (
    "enlarged cardiomediastinum",
    "cardiomegaly",
    "lung opacity",
    "lung lesion",
    "edema",
    "consolidation",
    "pneumonia",
    "atelectasis",
    "pneumothorax",
    "pleural effusion",
    "pleural other",
    "fracture",
    "support devices",
    "no finding",
)
NUM_OBSERVATIONS = len(OBSERVATIONS)
NO_FINDING = OBSERVATIONS.index("no finding")

# Label codes (one int8 per observation).
BLANK, POSITIVE, NEGATIVE, UNCERTAIN = 0, 1, 2, 3
LABEL_NAMES: tuple[str, ...] = ("blank", "positive", "negative", "uncertain")
NUM_STATES = len(LABEL_NAMES)

SPLITS: tuple[str, ...] = ("train", "val", "test")

ARROW_SCHEMA = pa.schema(
    [
        pa.field("study_id", pa.string(), nullable=False),
        pa.field("center", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("images", pa.list_(pa.binary()), nullable=False),
        pa.field("view", pa.string(), nullable=False),
        pa.field("report", pa.string(), nullable=False),
        pa.field("labels", pa.list_(pa.int8()), nullable=False),
    ]
)
COLUMNS: tuple[str, ...] = tuple(ARROW_SCHEMA.names)
