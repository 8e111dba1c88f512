"""flashcore-tune: placeholder until the tuning loop lands."""
import argparse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flashcore-tune", description="Tune FlashCore kernels (not yet).")
    parser.parse_args(argv)
    print("flashcore-tune: not yet")
    return 0
