"""flashcore-bench: placeholder."""
def main(argv=None) -> int:
    print("flashcore-bench: not yet")
    return 0
