"""Thin actor shells around the pure core; plain classes made remote by the driver."""
