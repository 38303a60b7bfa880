"""nanoGPT-style configuration: config = configure(globals(), sys.argv[1:]) applies config files (their assignments)
and --key=value overrides (ast.literal_eval, else a string; a bare --key sets a bool) to a script's settings.
Unlike nanoGPT, an unknown key or a value of another type than the default is a ConfigError."""
import ast
import difflib
import os

# Names in ALL_CAPS are constants (e.g. EMOTIONS), _private names the script's own: neither is a setting.
CONFIG_TYPES = (bool, int, float, str, tuple, list, dict, type(None))


class ConfigError(ValueError):
    pass


def _checked(key, value, default):
    if default is None or value is None:
        return value  # a None default ("not set") accepts any type; any setting may be set back to None
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    if isinstance(value, type(default)) and isinstance(value, bool) == isinstance(default, bool):
        return value  # bool is an int subclass: --flag=1 must not pass as True
    raise ConfigError(f"{key} expects {type(default).__name__} (default {default!r}), "
                      f"got {type(value).__name__} {value!r}")


def _set(g, keys, key, value, source):
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        hint = f"did you mean: {', '.join(close)}?" if close else f"known keys: {', '.join(sorted(keys))}"
        raise ConfigError(f"unknown config key {key!r} from {source} ({hint})")
    g[key] = _checked(key, value, g[key])
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, say it once
        print(f"config: {key} = {g[key]!r}  ({source})")


def configure(g, argv):
    """Apply config files and --key=value overrides to the settings dict g in place; returns the settings."""
    keys = [k for k, v in g.items() if not k.startswith("_") and not k.isupper() and isinstance(v, CONFIG_TYPES)]
    for arg in argv:
        if not arg.startswith("--"):
            with open(arg) as f:
                ns = {}
                exec(compile(f.read(), arg, "exec"), ns)
            for k, v in ns.items():
                if not k.startswith("_") and isinstance(v, CONFIG_TYPES):
                    _set(g, keys, k, v, arg)
            continue
        key, eq, text = arg[2:].partition("=")
        try:
            value = ast.literal_eval(text) if eq else True
        except (ValueError, SyntaxError):
            value = text  # --name=my_run: a bare word is a string
        _set(g, keys, key, value, f"--{key}")
    return {k: g[k] for k in keys}
