#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets into fuzz/corpus/<target>/.

Run from the crate root or from fuzz/: `python3 fuzz/make_corpus.py`. The seeds are kept in
the repository; tests/fuzz_parsers.rs replays every file as a regression test, so rerun this
only to change the seeds (libFuzzer's own finds go to fuzz/corpus-*/, which git ignores).
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = os.path.join(HERE, "..", "..", "shared", "cases", "public.jsonl")


def write(target, name, data):
    folder = os.path.join(HERE, "corpus", target)
    os.makedirs(folder, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def jsonl_seeds():
    with open(CASES) as f:
        for line in f:
            if line.strip():
                case = json.loads(line)
                write("jsonl_line", "case_" + case["id"], line.rstrip("\n"))
    hostile = {
        "huge_scores": '{"scores": [1e308, -1e308, 3.4e38, -0.0], "k": 2, "eps": 0.1}',
        "subnormal": '{"scores": [5e-324, 1e-310, -5e-324], "k": 1, "eps": 1e-300}',
        "special_strings": '{"x": ["inf", "-inf", "nan", "Infinity", 1], "k": 1, "eps": 1}',
        "k_float": '{"scores": [1, 2, 3], "k": 2.0, "eps": 0.1}',
        "k_fraction": '{"scores": [1, 2, 3], "k": 1.5, "eps": 0.1}',
        "k_negative": '{"scores": [1, 2, 3], "k": -1, "eps": 0.1}',
        "k_huge": '{"scores": [1, 2, 3], "k": 1e300, "eps": 0.1}',
        "k_string": '{"scores": [1, 2, 3], "k": "2", "eps": 0.1}',
        "eps_zero": '{"scores": [1, 2], "k": 1, "eps": 0}',
        "eps_negative": '{"scores": [1, 2], "k": 1, "eps": -1}',
        "eps_nan": '{"scores": [1, 2], "k": 1, "eps": "nan"}',
        "eps_tiny": '{"scores": [1, 2, 2, 3], "k": 2, "eps": 1e-300}',
        "nested": '{"scores": [[1, 2], [3]], "k": 1, "eps": 0.1}',
        "deep": '{"scores": ' + "[" * 200 + "]" * 200 + ', "k": 1, "eps": 0.1}',
        "string_score": '{"scores": [1, "two", 3], "k": 1, "eps": 0.1}',
        "empty": '{"scores": [], "k": 0, "eps": 0.1}',
        "valid_mask": '{"scores": [1, 2, 3, 4], "k": 3, "eps": 0.1, '
        '"valid": [true, false, 1, 0]}',
        "valid_short": '{"scores": [1, 2, 3], "k": 1, "eps": 0.1, "valid": [true]}',
        "sorted_ranks_kn": '{"scores": [0.1, 0.9, 0.5], "k": 2, "eps": 0.1, '
        '"variant": "sorted", "cotangent": [[1, 0, 0], [0, 1, 0]]}',
        "sorted_ranks_nk": '{"scores": [0.1, 0.9, 0.5], "k": 2, "eps": 0.1, '
        '"variant": "sorted", "v": [[1, 0], [0, 1], [0.5, 0.5]]}',
        "sinkhorn": '{"scores": [0.1, 0.9, 0.5, 0.3], "k": 2, "eps": 0.05, '
        '"solver": "sinkhorn", "tolerance": 1e-9, "max_iterations": 500}',
        "newton_sorted": '{"scores": [0.1, 0.9, 0.5, 0.3], "k": 3, "eps": 0.05, '
        '"variant": "sorted", "solver": "newton", "scale": "max", "largest": false}',
        "bad_solver": '{"scores": [1], "k": 1, "eps": 1, "solver": "magic"}',
        "iterations_float": '{"scores": [1, 2], "k": 1, "eps": 1, "solver": "sinkhorn", '
        '"max_iterations": 1e20}',
        "not_utf8": b'{"scores": [1, 2], "k": 1, "eps": 0.1, "id": "\xff\xfe"}',
        "truncated": '{"scores": [1, 2, 3], "k": 1, "ep',
        "not_object": "[1, 2, 3]",
        # Found by tests/fuzz_parsers.rs: a NaN sorted plan at a temperature beyond f64.
        "regression_sorted_eps_subnormal": '{"scores": [0, 0, 0, 0, 0, 0, 0], "k": 1, '
        '"eps": 5e-324, "variant": "sorted"}',
        "regression_spread_1e300": '{"scores": [1e300, -1e300, 0, 5], "k": 2, "eps": 1e-10, '
        '"variant": "sorted", "cotangent": [1, 2, 3, 4]}',
        "duplicate_key": '{"scores": [1], "scores": [2, 3], "k": 1, "eps": 0.1}',
    }
    for name, text in hostile.items():
        write("jsonl_line", name, text)


def npy(descr, shape, payload, fortran=False, version=1, header_extra=""):
    dims = "".join(f"{d}, " if len(shape) == 1 else f"{d}," for d in shape)
    dims = f"({dims.rstrip(',') if len(shape) > 1 else dims.rstrip()})"
    header = (
        f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {dims}, "
        f"{header_extra}}}"
    )
    prefix_len = 10 if version == 1 else 12
    pad = (64 - (prefix_len + len(header) + 1) % 64) % 64
    header = header + " " * pad + "\n"
    size = struct.pack("<H", len(header)) if version == 1 else struct.pack("<I", len(header))
    return b"\x93NUMPY" + bytes([version, 0]) + size + header.encode() + payload


def npy_seeds():
    f32 = lambda values: struct.pack(f"<{len(values)}f", *values)
    f64 = lambda values: struct.pack(f"<{len(values)}d", *values)
    write("npy_reader", "f32_2x3", npy("<f4", (2, 3), f32([0.1, 0.9, 0.5, 2, -1, 0])))
    write("npy_reader", "f32_1d", npy("<f4", (4,), f32([3, 1, 4, 1])))
    write("npy_reader", "f64_2x2", npy("<f8", (2, 2), f64([1, 2, 3, 4])))
    write("npy_reader", "f32_fortran", npy("<f4", (2, 3), f32(range(6)), fortran=True))
    write("npy_reader", "f32_3d", npy("<f4", (2, 2, 2), f32(range(8))))
    write("npy_reader", "bool_2x2", npy("|b1", (2, 2), bytes([1, 0, 0, 1])))
    write("npy_reader", "i1_3", npy("|i1", (3,), bytes([1, 255, 0])))
    write("npy_reader", "u1_3", npy("|u1", (3,), bytes([1, 2, 0])))
    write("npy_reader", "f32_v2", npy("<f4", (2,), f32([1, 2]), version=2))
    write("npy_reader", "f32_big_endian", npy(">f4", (2,), struct.pack(">2f", 1, 2)))
    write("npy_reader", "f32_scalar", npy("<f4", (), f32([7])))
    write("npy_reader", "f32_empty", npy("<f4", (0, 3), b""))
    write("npy_reader", "f32_nonfinite", npy("<f4", (4,), f32([float("nan"), float("inf"),
                                                              float("-inf"), 0])))
    write("npy_reader", "claims_1e12", npy("<f4", (1000000, 1000000), f32([1, 2])))
    write("npy_reader", "shape_overflow", npy("<f8", (2**40, 2**40), b""))
    write("npy_reader", "truncated", npy("<f4", (2, 3), f32([1, 2]))[:-3])
    write("npy_reader", "trailing", npy("<f4", (2,), f32([1, 2, 3])))
    write("npy_reader", "i4_unsupported", npy("<i4", (2,), struct.pack("<2i", 1, 2)))
    write("npy_reader", "structured", b"\x93NUMPY\x01\x00" + struct.pack("<H", 54)
          + b"{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }\n"[:54])
    write("npy_reader", "header_len_huge", b"\x93NUMPY\x02\x00\xff\xff\xff\x7f{")
    write("npy_reader", "bad_magic", b"\x93NUMPX\x01\x00\x10\x00{}")
    # Found by cargo fuzz: npyz's header parser backtracks on unclosed brackets (timeout).
    nested = (b"\x93NUMPY\x01\x00v\x00{'descr': '<i5', " + b"[" * 37
              + b"'fortran_order': False, 'shape': (3,), }")
    write("npy_reader", "regression_nested_brackets",
          nested + b" " * (128 - len(nested) - 1) + b"\n" + bytes([1, 0, 0, 0, 2, 0, 0, 0]))
    write("npy_reader", "two_shapes", npy("<f4", (1,), f32([1]), header_extra="'shape': (5,), "))


def batch_seeds():
    # rows, n, flags, k, then what the flags select (see fuzz_targets/batch.rs), then scores.
    f32 = lambda values: struct.pack(f"<{len(values)}f", *values)
    write("batch", "topk_2x3", bytes([2, 3, 2, 1, 2]) + f32([0.1, 0.9, 0.5, 2, -1, 0]))
    write("batch", "sorted_1x4", bytes([1, 4, 6, 2, 2]) + f32([0.3, 0.1, 0.4, 0.2]))
    write("batch", "smallest_max", bytes([1, 4, 26, 2, 2]) + f32([3e38, -3e38, 1, 0]))
    write("batch", "per_row_k", bytes([3, 2, 66, 0, 2, 0, 1, 2]) + f32([1, 2, 3, 4, 5, 6]))
    write("batch", "valid_mask", bytes([2, 2, 130, 1, 2]) + f32([1, 2, float("nan"), 4]))
    write("batch", "eps_bits", bytes([1, 3, 0, 1]) + struct.pack("<d", 1e-30)
          + f32([1, 1, 1]))
    write("batch", "subnormals", bytes([1, 4, 2, 2, 0]) + struct.pack("<4I", 1, 2, 3, 0x80000001))
    write("batch", "mismatch", bytes([2, 3, 2, 1, 2]) + f32([1, 2, 3]))
    write("batch", "all_ones", b"\xff" * 64)
    write("batch", "all_zeros", b"\x00" * 64)


if __name__ == "__main__":
    jsonl_seeds()
    npy_seeds()
    batch_seeds()
