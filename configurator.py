"""
nanoGPT-style configuration: a training script keeps its settings as module-level globals with their
defaults at the top, then calls

    config = configure(globals(), sys.argv[1:])

    python train_semantic.py config/tiny.py --batch_size=32 --lr=3e-4 --resume

A positional argument is a Python config file whose top-level assignments are applied in order; a
`--key=value` argument overrides one setting (the value is parsed with ast.literal_eval, and kept as
a plain string when that fails); a bare `--key` sets a bool setting to True. Later arguments win.
Unlike nanoGPT, which exec()s the file into the script's globals, every key is checked: an unknown
one raises ConfigError with the close matches, and a value of another type than the default raises
too (a typo must never silently train the wrong thing).
"""
import ast
import difflib
import os

# Setting types a command line can express. Names in ALL_CAPS are constants (e.g. EMOTIONS imported
# from data.py), never settings, and _private names are the script's own business.
CONFIG_TYPES = (bool, int, float, str, tuple, list, dict, type(None))


class ConfigError(ValueError):
    pass


def config_keys(g):
    return [k for k, v in g.items() if not k.startswith("_") and not k.isupper() and isinstance(v, CONFIG_TYPES)]


def _coerce(key, value, default):
    """value checked against the default's type; int -> float and list <-> tuple are the only conversions."""
    if default is None or value is None:
        return value  # a None default ("not set") accepts any type; any setting may be set back to None
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value  # bool is an int subclass: keep --flag=1 from passing as True (and vice versa)
    elif isinstance(default, float) and isinstance(value, int):
        return float(value)
    elif isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    elif isinstance(value, type(default)):
        return value
    raise ConfigError(f"{key} expects {type(default).__name__} (default {default!r}), "
                      f"got {type(value).__name__} {value!r}")


def _parse(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # --name=my_run: a bare word is a string


def _set(g, keys, key, value, source):
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        hint = f"did you mean: {', '.join(close)}?" if close else f"known keys: {', '.join(sorted(keys))}"
        raise ConfigError(f"unknown config key {key!r} from {source} ({hint})")
    g[key] = _coerce(key, value, g[key])
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, say it once
        print(f"config: {key} = {g[key]!r}  ({source})")


def configure(g, argv):
    """Apply config files and --key=value overrides from argv to the settings dict g (e.g. globals())
    in place. Returns the settings as a plain dict, ready for config.json."""
    keys = config_keys(g)
    for arg in argv:
        if not arg.startswith("--"):
            ns = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), ns)
            for k, v in ns.items():
                if not k.startswith("_") and isinstance(v, CONFIG_TYPES):
                    _set(g, keys, k, v, arg)
            continue
        key, eq, text = arg[2:].partition("=")
        if not eq:
            if key in keys and not isinstance(g[key], bool):
                raise ConfigError(f"--{key} needs a value (--{key}=...): only bool settings can be bare flags")
            value = True
        else:
            value = _parse(text)
        _set(g, keys, key, value, f"--{key}")
    return {k: g[k] for k in keys}
