"""Stage 2, train / sft: the recipe (`recipe`), the objective and its estimators (`objective`, `likelihood`),
attention annealing and block diffusion (`annealing`, `blocks`), data (`batch`, `data`, `sft_data`), the model to
train (`model_io`), the run directory and training state (`run_dir`, `training_state`) and sharding (`distributed`)."""
