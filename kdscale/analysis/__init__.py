"""Reading runs back: wandb run files, metrics, comparisons."""
