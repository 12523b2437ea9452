"""Ready recipes: each is a chain of building blocks."""

from fprecond.optimizers.first_order import adam, adamw, sgd

__all__ = ["adam", "adamw", "sgd"]
