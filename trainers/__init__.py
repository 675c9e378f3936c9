"""The conditional supervised trainer: data loader, encoders, models, train, ask."""
