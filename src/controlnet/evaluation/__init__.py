"""How well outputs follow their condition: per-image metrics and the evaluation of a data set."""
