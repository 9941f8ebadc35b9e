"""Re-write a GGUF model as gguf-split parts with the `gguf` Python package (llama.cpp's own
writer), so `shard_loader map` is tested on parts that our code did not write.

usage: make_gguf_split.py SOURCE.gguf OUT_DIR PARTS
writes OUT_DIR/<stem>-0000K-of-0000N.gguf
"""
import math
import os
import sys

from gguf import GGUFReader, GGUFValueType, GGUFWriter


def copy_model(reader: GGUFReader, writer: GGUFWriter, drop: frozenset = frozenset()) -> None:
    """Copy every metadata key (except those in `drop`) and tensor of `reader` into `writer`,
    and write the file(s)."""
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    source, out_dir, parts = sys.argv[1], sys.argv[2], int(sys.argv[3])
    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    per_part = math.ceil(len(reader.tensors) / parts)
    stem = os.path.splitext(os.path.basename(source))[0]
    writer = GGUFWriter(os.path.join(out_dir, stem + ".gguf"), arch, split_max_tensors=per_part)
    copy_model(reader, writer)


if __name__ == "__main__":
    main()
