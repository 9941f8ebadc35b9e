"""Re-write a GGUF file with the `gguf` Python package, leaving out metadata keys: how tests
make a file that an older or careless tool could have written.

usage: rewrite_gguf.py IN.gguf OUT.gguf --drop KEY [--drop KEY ...]
"""
import argparse

from gguf import GGUFReader, GGUFWriter

from make_gguf_split import copy_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("out")
    ap.add_argument("--drop", action="append", default=[])
    args = ap.parse_args()
    reader = GGUFReader(args.source)
    arch = reader.fields["general.architecture"].contents()
    copy_model(reader, GGUFWriter(args.out, arch), frozenset(args.drop))


if __name__ == "__main__":
    main()
