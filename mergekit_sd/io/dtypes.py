"""The safetensors dtype names: their sizes in bits and their torch equivalents; the names
users give (--dtype, a recipe's output.dtype) and the one parser every command reads them with."""

import difflib

from mergekit_sd.errors import UserError

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


# The short names, in the order lists show them; each command takes its own selection (with
# "keep" or "auto" where it has one) through `parse_dtype`.
SHORT_DTYPES = tuple(name for name in USER_DTYPES if name not in DTYPE_ALIASES)
CHECKPOINT_DTYPES = ("keep", *SHORT_DTYPES)  # convert, a recipe's output.dtype, bake
LORA_DTYPES = ("fp16", "bf16", "fp32")  # lora merge/extract: factors in fp8 lose too much
RENDER_DTYPES = ("auto", "fp32", "fp16", "bf16")  # what a pipeline computes in


def dtype_name(text: str) -> str:
    """What a user typed as a dtype, in lower case and by its short name ("Float16" -> "fp16");
    a name that is none of USER_DTYPES or "keep" is left for the caller to refuse."""
    key = str(text).strip().lower()
    return DTYPE_ALIASES.get(key, key)


def dtype_problem(text: str, accepted: tuple[str, ...], writer: str) -> str | None:
    """None when `text` names one of `accepted` (by its short name, an alias, in any case);
    else why not, as the end of one sentence that starts with the value's name (--dtype,
    output.dtype): the names `writer` (e.g. "bake") accepts, and the nearest one."""
    key = dtype_name(text)
    if key in accepted:
        return None
    aliases = [alias for alias, short in DTYPE_ALIASES.items() if short in accepted]
    names = f"{', '.join(accepted[:-1])} or {accepted[-1]}"
    if aliases:
        names += f" (also {', '.join(aliases)}, in any case)"
    near = [] if key in USER_DTYPES else difflib.get_close_matches(key, [*accepted, *aliases], n=1)
    takes = f"did you mean {near[0]!r}? It takes" if near else "it takes"
    return f"{text!r} is not a dtype {writer} takes; {takes} {names}"


def parse_dtype(text: str, accepted: tuple[str, ...], writer: str,
                option: str = "--dtype") -> str:
    """The short name of the dtype `text` names ("Float16" -> "fp16"), when `writer` takes it
    (one of `accepted`); else a UserError of one sentence naming `option` and the choices."""
    problem = dtype_problem(text, accepted, writer)
    if problem is not None:
        raise UserError(f"{option} {problem}")
    return dtype_name(text)


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
