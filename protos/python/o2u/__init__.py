"""Generated protocol code for o2u.v1; never edit by hand (see protos/generate.py)."""
