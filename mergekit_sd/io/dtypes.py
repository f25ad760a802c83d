"""The safetensors dtype names: their sizes in bits and their torch equivalents."""

# name -> (bits per element, torch dtype attribute name)
SAFETENSORS_DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (8, "bool"),
    "U8": (8, "uint8"),
    "I8": (8, "int8"),
    "F8_E4M3": (8, "float8_e4m3fn"),
    "F8_E5M2": (8, "float8_e5m2"),
    "F8_E8M0": (8, "float8_e8m0fnu"),
    "I16": (16, "int16"),
    "U16": (16, "uint16"),
    "F16": (16, "float16"),
    "BF16": (16, "bfloat16"),
    "I32": (32, "int32"),
    "U32": (32, "uint32"),
    "F32": (32, "float32"),
    "C64": (64, "complex64"),
    "I64": (64, "int64"),
    "U64": (64, "uint64"),
    "F64": (64, "float64"),
    "F4": (4, "float4_e2m1fn_x2"),
    "F6_E2M3": (6, ""),
    "F6_E3M2": (6, ""),
}

FLOAT_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"})

# What users type (--dtype, recipe `dtype:`) -> safetensors name.
USER_DTYPES: dict[str, str] = {
    "fp32": "F32",
    "float32": "F32",
    "fp16": "F16",
    "float16": "F16",
    "bf16": "BF16",
    "bfloat16": "BF16",
    "fp8_e4m3fn": "F8_E4M3",
    "fp8_e5m2": "F8_E5M2",
}
# torch's names for three of them: taken alike by `convert --dtype` and a recipe's
# output.dtype, and recorded (in a recipe, in convert's metadata) as the short name
DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def dtype_name(text: str) -> str:
    """What a user typed as a dtype, in lower case and by its short name ("Float16" -> "fp16");
    a name that is none of USER_DTYPES or "keep" is left for the caller to refuse."""
    key = str(text).strip().lower()
    return DTYPE_ALIASES.get(key, key)


def nbytes_of(dtype: str, numel: int) -> int | None:
    """Bytes that `numel` elements of `dtype` occupy, or None when they do not fill whole bytes."""
    bits = SAFETENSORS_DTYPES[dtype][0] * numel
    return bits // 8 if bits % 8 == 0 else None


def torch_dtype(dtype: str):
    """The torch dtype for a safetensors dtype name (imports torch, so only call it for tensors)."""
    import torch

    name = SAFETENSORS_DTYPES[dtype][1]
    if not name or not hasattr(torch, name):
        raise ValueError(f"this torch build has no dtype for safetensors {dtype}")
    return getattr(torch, name)


def safetensors_dtype(torch_dtype_) -> str:
    """The safetensors name of a torch dtype."""
    name = str(torch_dtype_).removeprefix("torch.")
    for st_name, (_, torch_name) in SAFETENSORS_DTYPES.items():
        if torch_name == name:
            return st_name
    raise ValueError(f"safetensors cannot store torch dtype {name}")
