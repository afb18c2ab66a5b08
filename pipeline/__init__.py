"""GRESO on Ray: the pure core (selection, GRPO maths, rewards, data) and the driver."""
