"""The training presets shipped inside the package (artscale/train/configs/*.yaml): found by name, listed, printed.

They are package data, so `--config diffusion` works from an installed wheel as from a checkout;
`artscale configs show NAME > my.yaml` gives one to edit.
"""

from __future__ import annotations

from pathlib import Path, PurePath

from artscale.core.errors import UserError

PRESETS_DIR = Path(__file__).resolve().parent / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _preset_name(config: str) -> str:
    """`article`, `article.yaml`, or the checkout's old path `configs/article.yaml` -> `article`; else ''."""
    parts = PurePath(config).parts
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == "configs"):
        name = parts[-1]
        return name.rsplit(".", 1)[0] if name.endswith((".yaml", ".yml")) else name
    return ""


def _unknown(what: str) -> UserError:
    return UserError(f"{what}; presets: {', '.join(preset_names())} (artscale configs lists them)")


def resolve_config(config: str | Path) -> Path:
    """The YAML file a `--config` value names: a path that exists wins, else a packaged preset of that name."""
    path = Path(config)
    if path.is_file():
        return path
    name = _preset_name(str(config))
    if name in preset_names():
        return PRESETS_DIR / f"{name}.yaml"
    raise _unknown(f"config {config} is neither a file nor a preset")


def describe_presets() -> str:
    """One line per preset: its name and the first line of its leading comment."""
    names = preset_names()
    width = max(map(len, names))
    lines = []
    for name in names:
        text = (PRESETS_DIR / f"{name}.yaml").read_text().lstrip()
        first = text.splitlines()[0].lstrip("#").strip() if text.startswith("#") else ""
        lines.append(f"{name:<{width}}  {first}".rstrip())
    return "\n".join(lines)


def show_preset(name: str) -> str:
    """The preset's YAML text, as shipped."""
    if name not in preset_names():
        raise _unknown(f"no preset named {name}")
    return (PRESETS_DIR / f"{name}.yaml").read_text()
