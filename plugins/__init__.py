"""First-party plugins of voiced, each a small module enabled by name in the config.

    [plugins]
    enabled = ["lexicon", "trim", "loudness", "archive", "journal"]   # the chain order

    [plugins.loudness]
    target_lufs = -16.0

Each module declares its settings as a dataclass ``Settings`` (keys of ``[plugins.NAME]``)
and a factory ``plugin(settings)`` returning the object whose ``@hookimpl`` methods voiced
calls (see ``voiced/hooks/specs.py`` for the hooks and ``voiced/hooks/host.py`` for how they
are loaded and called). They are declared in the entry-point group ``voiced.optional`` of
voiced's ``pyproject.toml``, as any package's optional plugins would be:

* ``loudness`` - normalise to a target integrated loudness (ITU-R BS.1770) under a true-peak ceiling
* ``trim``     - trim leading/trailing silence, then pad and fade
* ``lexicon``  - a pronunciation lexicon: whole-word text replacements before synthesis
* ``archive``  - keep every reply as WAV + JSON metadata in a folder with a size cap
* ``journal``  - append voice lifecycle events as JSON lines to a file
"""
