"""Fine-tuning: ``data`` (instruction records -> MindRecord samples), ``config`` (a run's yaml with the command
line applied), ``launch`` (checks before a launch, rank tables), ``callbacks`` (progress, checkpoints) and
``finetune`` (MindFormers' Trainer around them)."""
