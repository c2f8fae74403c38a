"""Parameter names and shapes of the official checkpoints (from the official releases' files)."""
from pathlib import Path

REFERENCE_DIR = Path(__file__).parent / "data" / "reference"


def read_keys(name: str) -> dict:
    """``name`` (file stem without .keys.tsv) -> {parameter name: shape tuple}."""
    path = REFERENCE_DIR / f"{name}.keys.tsv"
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            out[key] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    return out


def official_dpt_names(model) -> dict:
    """Our DPT model's state dict under the official DPT names (the DPT project's key map,
    read backwards)."""
    from dpt.checkpoint import official_dpt_state_dict

    return official_dpt_state_dict(model.state_dict())
