"""The flags of the tiny training runs the command-line tests start: the smallest model (one conv, ReLU,
FC) and big batches keep each run to a few seconds."""

TINY = [
    "--model",
    "dd2424_net",
    "--batch-size",
    "64",
    "--optimizer",
    "momentum",
    "--lr",
    "0.05",
    "--schedule",
    "constant",
    "--val-fraction",
    "0",
    "--seed",
    "3",
]
