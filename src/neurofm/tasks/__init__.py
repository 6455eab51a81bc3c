"""LightningModules: pretraining and fine-tuning."""
