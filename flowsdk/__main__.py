"""`python -m flowsdk`: the command line (the same program as the `flowsdk` script)."""

from flowsdk.cli import entry_point

if __name__ == "__main__":
    entry_point()
