"""segkd training engine: config, data, models, methods, trainer, evaluation."""
