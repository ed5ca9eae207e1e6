"""The file names of a checkpoint folder (import-light: readers of descriptors need no torch)."""

MODEL_FILE = "model.safetensors"
INFO_FILE = "checkpoint.json"
STATE_FILE = "train_state.pt"
BEST_FILE = "best.safetensors"
KIND = "carsearch.checkpoint"
