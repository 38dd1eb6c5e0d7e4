"""Stage 4: the fine-tuning loop, its configuration, resumable checkpoints, BatchNorm
recalibration, on-device batches and multi-process training."""
