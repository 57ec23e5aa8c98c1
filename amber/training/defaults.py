"""Training defaults the API states before any training code is imported (the API process never
imports torch training code). `TrainConfig` (lora.py) uses the same values; bench/train_sst2.py
has the measurements behind them."""
DEFAULT_LEARNING_RATE = 1e-3
DEFAULT_EPOCHS = 3
MAX_EPOCHS = 20
