"""The data vocabulary every task shares: the splits, the column roles, the file formats local data may have."""

DATA_SPLITS: tuple[str, ...] = ("train", "validation", "test")
COLUMN_ROLES: tuple[str, ...] = ("text", "text_pair", "label", "target")
# File suffix -> the `datasets` builder that reads it.
DATA_FILE_FORMATS: dict[str, str] = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
